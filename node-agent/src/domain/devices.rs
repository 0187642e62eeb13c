//! Decides the plain devices every desktop gets: a serial port with a console on it (for
//! `virsh console` and boot logs), a USB tablet for an absolute pointer, a virtio balloon.

use super::xml::{Console, ConsoleTarget, Input, MemBalloon, Serial, SerialTarget};

/// `<serial type='pty'>` on port 0.
pub fn serial() -> Serial {
    Serial {
        kind: "pty",
        target: SerialTarget { port: 0 },
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
