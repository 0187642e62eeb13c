//! The USB redirection policy of a desktop, as the API declares it (a Desktop's
//! `spec.display.usb`, a pool's `spec.defaults.usb`): plain values both binaries share.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A 16-bit USB id written in hex, such as 0x046d.
pub const USB_ID: &str = r"^0x[0-9a-fA-F]{4}$";
/// A USB class code written in hex, such as 0x08 (mass storage).
pub const USB_CLASS: &str = r"^0x[0-9a-fA-F]{2}$";

fn default_true() -> bool {
    true
}

/// USB redirection policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsbPolicy {
    /// Let the SPICE client redirect local USB devices into the desktop.
    #[serde(default = "default_true")]
    pub redirect: bool,
    /// Number of devices that can be redirected at once, 1 to 8.
    #[serde(default = "default_usb_channels")]
    #[schemars(range(min = 1, max = 8))]
    pub channels: u8,
    /// Devices allowed; when empty, every device not denied is allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub allow: Vec<UsbFilter>,
    /// Devices refused; checked before `allow`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub deny: Vec<UsbFilter>,
}

fn default_usb_channels() -> u8 {
    2
}

impl Default for UsbPolicy {
    fn default() -> Self {
        Self {
            redirect: true,
            channels: default_usb_channels(),
            allow: vec![],
            deny: vec![],
        }
    }
}

/// A USB device filter; every field left out matches any device.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsbFilter {
    /// USB class code in hex, such as 0x08 for mass storage.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "class")]
    #[schemars(regex(pattern = USB_CLASS))]
    pub class: Option<String>,
    /// Vendor id in hex, such as 0x046d.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = USB_ID))]
    pub vendor: Option<String>,
    /// Product id in hex, such as 0xc52b.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = USB_ID))]
    pub product: Option<String>,
}
