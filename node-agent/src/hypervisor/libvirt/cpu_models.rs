//! Decides which named CPU models a host offers its domains: the usable models of the custom
//! mode in libvirt's domain capabilities, as a pool's `spec.cpu.model` names them.

use serde::Deserialize;

/// The most models reported (the status field's bound).
pub const MAX_MODELS: usize = 256;

#[derive(Deserialize)]
struct Capabilities {
    #[serde(default)]
    cpu: Option<Cpu>,
}

#[derive(Deserialize)]
struct Cpu {
    #[serde(rename = "mode", default)]
    modes: Vec<Mode>,
}

#[derive(Deserialize)]
struct Mode {
    #[serde(rename = "@name", default)]
    name: String,
    #[serde(rename = "model", default)]
    models: Vec<Model>,
}

#[derive(Deserialize)]
struct Model {
    #[serde(rename = "@usable", default)]
    usable: Option<String>,
    #[serde(rename = "$text", default)]
    name: String,
}

/// The usable custom-mode model names in `xml` (a `<domainCapabilities>` document), sorted,
/// without duplicates, at most [`MAX_MODELS`].
pub fn usable(xml: &str) -> Result<Vec<String>, quick_xml::DeError> {
    let caps: Capabilities = quick_xml::de::from_str(xml)?;
    let mut names: Vec<String> = caps
        .cpu
        .into_iter()
        .flat_map(|c| c.modes)
        .filter(|m| m.name == "custom")
        .flat_map(|m| m.models)
        .filter(|m| m.usable.as_deref() == Some("yes"))
        .map(|m| m.name.trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names.dedup();
    names.truncate(MAX_MODELS);
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: &str = r#"<domainCapabilities>
  <path>/usr/bin/qemu-system-x86_64</path>
  <cpu>
    <mode name='host-passthrough' supported='no'/>
    <mode name='host-model' supported='yes'>
      <model fallback='forbid'>EPYC</model>
      <feature policy='require' name='acpi'/>
    </mode>
    <mode name='custom' supported='yes'>
      <model usable='yes' vendor='unknown'>qemu64</model>
      <model usable='no' vendor='AMD'>phenom</model>
      <model usable='yes' vendor='Intel'>Westmere</model>
      <model usable='unknown' vendor='Intel'>Skylake-Client</model>
      <model usable='yes' vendor='unknown'>qemu64</model>
    </mode>
  </cpu>
  <devices><disk supported='yes'/></devices>
</domainCapabilities>"#;

    #[test]
    fn only_usable_custom_models_are_offered() -> Result<(), quick_xml::DeError> {
        assert_eq!(usable(CAPS)?, ["Westmere", "qemu64"]);
        Ok(())
    }

    #[test]
    fn a_host_without_a_custom_mode_offers_nothing() -> Result<(), quick_xml::DeError> {
        assert!(usable("<domainCapabilities><path>x</path></domainCapabilities>")?.is_empty());
        assert!(usable("<domainCapabilities><cpu><mode name='custom' supported='no'/></cpu></domainCapabilities>")?.is_empty());
        Ok(())
    }

    #[test]
    fn a_long_list_is_bounded() -> Result<(), quick_xml::DeError> {
        let models: String = (0..MAX_MODELS + 10)
            .map(|i| format!("<model usable='yes'>m{i:04}</model>"))
            .collect();
        let xml = format!(
            "<domainCapabilities><cpu><mode name='custom'>{models}</mode></cpu></domainCapabilities>"
        );
        assert_eq!(usable(&xml)?.len(), MAX_MODELS);
        Ok(())
    }
}
