//! Decides the plain devices every desktop gets: a serial port with a console on it (for
//! `virsh console` and boot logs), a USB tablet for an absolute pointer, a virtio balloon.

use super::xml::{Console, ConsoleTarget, Input, MemBalloon, Serial, SerialLog, SerialTarget};

/// Directory of the serial logs, where libvirt keeps its per-domain QEMU logs.
pub const SERIAL_LOG_DIR: &str = "/var/log/libvirt/qemu";

/// The serial log file of domain `domain` (a safe file name, see `names::domain_name`).
pub fn serial_log_path(domain: &str) -> String {
    format!("{SERIAL_LOG_DIR}/{domain}-serial.log")
}

/// `<serial type='pty'>` on port 0, logged to [`serial_log_path`] so boot output is kept.
pub fn serial(domain: &str) -> Serial {
    Serial {
        kind: "pty",
        target: SerialTarget { port: 0 },
        log: SerialLog {
            file: serial_log_path(domain),
            append: "on",
        },
    }
}

/// `<console type='pty'>` on serial port 0.
pub fn console() -> Console {
    Console {
        kind: "pty",
        target: ConsoleTarget {
            kind: "serial",
            port: 0,
        },
    }
}

/// A USB tablet, so the SPICE pointer needs no grabbing.
pub fn tablet() -> Input {
    Input {
        kind: "tablet",
        bus: "usb",
    }
}

/// A virtio memory balloon, needed for memory overcommit.
pub fn memballoon() -> MemBalloon {
    MemBalloon { model: "virtio" }
}
