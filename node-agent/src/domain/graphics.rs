//! Decides the desktop's console: a SPICE server on the port the operator allocated, bound to
//! the pool's listen address, with a password and optional TLS; a QXL card; the vdagent channel.

use deskvirt_crds::resource_pool::ListenPolicy;

use super::secret::Secret;
use super::xml::{Channel, ChannelTarget, Graphics, GraphicsListen, Video, VideoModel};

/// SPICE settings of one desktop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiceConfig {
    /// Port on the host, from the operator's binding; [`ANY_PORT`] lets libvirt pick a free
    /// one (a suspended desktop restored only to move away holds no port on its host).
    pub port: u16,
    /// Address the SPICE server listens on.
    pub listen: String,
    /// The SPICE ticket; redacted from Debug output.
    pub password: Secret,
    /// Serve TLS only (the port becomes the TLS port).
    pub tls: bool,
}

/// The port that asks libvirt for any free one (`autoport`).
pub const ANY_PORT: u16 = 0;

/// The listen address a pool's policy calls for on a host whose address is `node_address`.
pub fn listen_address(policy: ListenPolicy, node_address: &str) -> String {
    match policy {
        ListenPolicy::Node => node_address.to_string(),
        ListenPolicy::Loopback => "127.0.0.1".to_string(),
        ListenPolicy::Any => "0.0.0.0".to_string(),
    }
}

/// `<graphics type='spice'>`. With TLS the allocated port is the TLS port and no plain port is
/// opened; without, it is the plain port.
pub fn graphics(spice: &SpiceConfig) -> Graphics {
    let fixed = Some(spice.port).filter(|p| *p != ANY_PORT);
    let (port, tls_port, default_mode) = if spice.tls {
        (None, fixed, Some("secure"))
    } else {
        (fixed, None, None)
    };
    Graphics {
        kind: "spice",
        port,
        tls_port,
        autoport: if fixed.is_some() { "no" } else { "yes" },
        passwd: spice.password.clone(),
        default_mode,
        listen: GraphicsListen {
            kind: "address",
            address: spice.listen.clone(),
        },
    }
}

/// `<video>` with a QXL card, the one SPICE drives best.
pub fn video() -> Video {
    Video {
        model: VideoModel {
            kind: "qxl",
            heads: 1,
            primary: "yes",
        },
    }
}

/// The SPICE vdagent channel (clipboard, resolution, mouse mode).
pub fn vdagent_channel() -> Channel {
    Channel {
        kind: "spicevmc",
        target: ChannelTarget {
            kind: "virtio",
            name: "com.redhat.spice.0",
        },
    }
}

/// The QEMU guest agent's channel (libvirt picks the host side's socket): a backup freezes the
/// guest's file systems through it when an agent answers in the guest.
pub fn guest_agent_channel() -> Channel {
    Channel {
        kind: "unix",
        target: ChannelTarget {
            kind: "virtio",
            name: "org.qemu.guest_agent.0",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spice(tls: bool) -> SpiceConfig {
        SpiceConfig {
            port: 5901,
            listen: "10.0.0.5".into(),
            password: Secret::new("pw"),
            tls,
        }
    }

    #[test]
    fn tls_moves_the_port() {
        let plain = graphics(&spice(false));
        assert_eq!(
            (plain.port, plain.tls_port, plain.default_mode),
            (Some(5901), None, None)
        );
        let tls = graphics(&spice(true));
        assert_eq!(
            (tls.port, tls.tls_port, tls.default_mode),
            (None, Some(5901), Some("secure"))
        );
    }

    #[test]
    fn any_port_lets_libvirt_pick() {
        let mut any = spice(false);
        any.port = ANY_PORT;
        let g = graphics(&any);
        assert_eq!((g.port, g.tls_port, g.autoport), (None, None, "yes"));
        assert_eq!(graphics(&spice(false)).autoport, "no");
    }

    #[test]
    fn debug_hides_the_password() {
        assert!(!format!("{:?}", graphics(&spice(false))).contains("\"pw\""));
        assert!(!format!("{:?}", spice(false)).contains("\"pw\""));
    }

    #[test]
    fn listen_policies() {
        assert_eq!(listen_address(ListenPolicy::Node, "10.1.2.3"), "10.1.2.3");
        assert_eq!(
            listen_address(ListenPolicy::Loopback, "10.1.2.3"),
            "127.0.0.1"
        );
        assert_eq!(listen_address(ListenPolicy::Any, "10.1.2.3"), "0.0.0.0");
    }
}
