//! Decides how the domain boots: from its disk, or directly from a kernel and initrd in the
//! pool's image directory with a kernel command line.

use deskvirt_crds::desktop::DirectBoot;

use super::error::BuildError;
use super::text::is_xml_text;
use super::xml::{BootDev, Os, OsType};

/// Direct kernel boot with absolute paths on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBoot {
    /// Absolute path of the kernel.
    pub kernel: String,
    /// Absolute path of the initrd.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: Option<String>,
}

fn image_path(image_dir: &str, field: &'static str, name: &str) -> Result<String, BuildError> {
    // The rule the operator checks too (the CRD's FILE_NAME pattern): one clean segment.
    if deskvirt_crds::paths::check_file_name(name).is_err() {
        return Err(BuildError::BadFileName {
            field,
            value: name.to_string(),
        });
    }
    Ok(format!("{}/{name}", image_dir.trim_end_matches('/')))
}

impl KernelBoot {
    /// Resolves `spec.boot` against the pool's image directory.
    pub fn from_spec(spec: &DirectBoot, image_dir: &str) -> Result<Self, BuildError> {
        let kernel = image_path(image_dir, "spec.boot.kernel", &spec.kernel)?;
        let initrd = spec
            .initrd
            .as_deref()
            .map(|i| image_path(image_dir, "spec.boot.initrd", i))
            .transpose()?;
        if let Some(cmdline) = &spec.cmdline
            && !is_xml_text(cmdline)
        {
            return Err(BuildError::InvalidText {
                field: "spec.boot.cmdline",
            });
        }
        Ok(Self {
            kernel,
            initrd,
            cmdline: spec.cmdline.clone(),
        })
    }
}

/// `<os>`: q35 machine; direct kernel boot when given, else boot from the disk.
pub fn os(boot: Option<&KernelBoot>) -> Os {
    let os_type = OsType {
        arch: "x86_64",
        machine: "q35",
        value: "hvm",
    };
    match boot {
        Some(b) => Os {
            os_type,
            kernel: Some(b.kernel.clone()),
            initrd: b.initrd.clone(),
            cmdline: b.cmdline.clone(),
            boot: None,
        },
        None => Os {
            os_type,
            kernel: None,
            initrd: None,
            cmdline: None,
            boot: Some(BootDev { dev: "hd" }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kernel: &str) -> DirectBoot {
        DirectBoot {
            kernel: kernel.into(),
            initrd: Some("initrd.img".into()),
            cmdline: None,
        }
    }

    #[test]
    fn paths_are_joined_inside_the_image_dir() {
        let boot = KernelBoot::from_spec(&spec("vmlinuz"), "/images/");
        assert_eq!(
            boot.map(|b| (b.kernel, b.initrd)),
            Ok(("/images/vmlinuz".into(), Some("/images/initrd.img".into())))
        );
    }

    #[test]
    fn traversal_is_rejected() {
        for bad in ["../etc/shadow", "a/b", ".hidden", ""] {
            assert!(
                matches!(
                    KernelBoot::from_spec(&spec(bad), "/images"),
                    Err(BuildError::BadFileName { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn control_characters_in_cmdline_are_rejected() {
        let mut s = spec("vmlinuz");
        s.cmdline = Some("console=ttyS0\u{7}".into());
        assert_eq!(
            KernelBoot::from_spec(&s, "/i"),
            Err(BuildError::InvalidText {
                field: "spec.boot.cmdline"
            })
        );
    }
}
