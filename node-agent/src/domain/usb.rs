//! Decides USB for a desktop: a qemu-xhci controller always (the tablet sits on it), and when
//! the policy allows redirection, N spicevmc redirection channels plus a filter of deny rules,
//! then allow rules, then a catch-all. With redirection off there is no redirdev and no filter.
//! The policy in force comes resolved against the pool
//! ([`deskvirt_crds::validation::ValidDesktop::usb`]).

use deskvirt_crds::desktop::{UsbFilter, UsbPolicy};

use super::xml::{Controller, RedirDev, RedirFilter, UsbDevRule};

/// The USB controller.
pub fn controller() -> Controller {
    Controller {
        kind: "usb",
        model: "qemu-xhci",
        ports: 15,
    }
}

/// One `<redirdev>` per channel when redirection is on.
pub fn redirdevs(policy: &UsbPolicy) -> Vec<RedirDev> {
    if !policy.redirect {
        return Vec::new();
    }
    (0..policy.channels)
        .map(|_| RedirDev {
            bus: "usb",
            kind: "spicevmc",
        })
        .collect()
}

fn rule(filter: &UsbFilter, allow: bool) -> UsbDevRule {
    UsbDevRule {
        class: filter.class.clone(),
        vendor: filter.vendor.clone(),
        product: filter.product.clone(),
        allow: if allow { "yes" } else { "no" },
    }
}

/// `<redirfilter>` when redirection is on: deny rules first, then allow rules, then a catch-all
/// that refuses everything else when an allow list exists and accepts everything otherwise.
pub fn redirfilter(policy: &UsbPolicy) -> Option<RedirFilter> {
    if !policy.redirect {
        return None;
    }
    let catch_all = UsbDevRule {
        class: None,
        vendor: None,
        product: None,
        allow: if policy.allow.is_empty() { "yes" } else { "no" },
    };
    let usbdev = policy
        .deny
        .iter()
        .map(|f| rule(f, false))
        .chain(policy.allow.iter().map(|f| rule(f, true)))
        .chain(std::iter::once(catch_all))
        .collect();
    Some(RedirFilter { usbdev })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(class: &str) -> UsbFilter {
        UsbFilter {
            class: Some(class.into()),
            vendor: None,
            product: None,
        }
    }

    #[test]
    fn off_means_no_redirection_at_all() {
        let policy = UsbPolicy {
            redirect: false,
            ..UsbPolicy::default()
        };
        assert!(redirdevs(&policy).is_empty());
        assert!(redirfilter(&policy).is_none());
    }

    #[test]
    fn deny_then_allow_then_closed_catch_all() {
        let policy = UsbPolicy {
            redirect: true,
            channels: 3,
            allow: vec![filter("0x03")],
            deny: vec![filter("0x08")],
        };
        assert_eq!(redirdevs(&policy).len(), 3);
        let rules = redirfilter(&policy).map(|f| f.usbdev).unwrap_or_default();
        let summary: Vec<_> = rules
            .iter()
            .map(|r| (r.class.as_deref(), r.allow))
            .collect();
        assert_eq!(
            summary,
            vec![(Some("0x08"), "no"), (Some("0x03"), "yes"), (None, "no")]
        );
    }

    #[test]
    fn without_allow_list_the_catch_all_accepts() {
        let policy = UsbPolicy {
            deny: vec![filter("0x08")],
            ..UsbPolicy::default()
        };
        let rules = redirfilter(&policy).map(|f| f.usbdev).unwrap_or_default();
        assert_eq!(rules.last().map(|r| r.allow), Some("yes"));
    }
}
