//! Decides how a host tells the operator that a desktop's SPICE port is taken by another
//! process on it (the agent's `Running=False SpicePortBusy` message names the port), and how the
//! operator reads which port that was, so a report about a port the desktop no longer holds
//! moves nothing.

/// The words before the port in the message.
const PREFIX: &str = "SPICE port ";
/// The words after it.
const TAKEN: &str = " is taken on the host by another process";

/// The agent's message for `port`, with what QEMU said (`detail`).
pub fn busy_message(port: u16, detail: &str) -> String {
    format!("{PREFIX}{port}{TAKEN}; the operator gives the desktop another port ({detail})")
}

/// The port a [`busy_message`] names.
pub fn busy_port(message: &str) -> Option<u16> {
    let rest = message.strip_prefix(PREFIX)?;
    let (port, after) = rest.split_at(rest.find(|c: char| !c.is_ascii_digit())?);
    if !after.starts_with(TAKEN) {
        return None;
    }
    port.parse().ok()
}

/// Whether a failed start's error says QEMU could not listen on its SPICE port (spice-server:
/// `reds_init_socket: binding socket to 0.0.0.0:5901 failed`, then `failed to initialize spice
/// server`). Other SPICE failures, such as TLS files that cannot be read, are not this.
pub fn port_taken(error: &str) -> bool {
    error.contains("reds_init_socket: binding socket to") && error.contains("failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_survives_the_round_trip() {
        let m = busy_message(41007, "qemu: failed to initialize spice server");
        assert_eq!(busy_port(&m), Some(41007));
        assert!(m.contains("41007"), "{m}");
        for other in [
            "",
            "SPICE port ",
            "SPICE port x is taken on the host by another process",
            "SPICE port 99999 is taken on the host by another process",
            "SPICE port 5901 is free",
            "the domain could not start",
        ] {
            assert_eq!(busy_port(other), None, "{other}");
        }
    }

    #[test]
    fn only_a_socket_qemu_could_not_bind_is_a_taken_port() {
        let qemu = "internal error: qemu unexpectedly closed the monitor: qemu-system-x86_64: \
                    warning: Spice: ../server/reds.cpp:2585:reds_init_socket: binding socket to \
                    0.0.0.0:5989 failed\nqemu-system-x86_64: warning: Spice: \
                    ../server/reds.cpp:3442:do_spice_init: Failed to open SPICE sockets\n\
                    qemu-system-x86_64: failed to initialize spice server";
        assert!(port_taken(qemu));
        assert!(!port_taken(
            "qemu-system-x86_64: failed to initialize spice server: TLS"
        ));
        assert!(!port_taken("internal error: process exited"));
    }
}
