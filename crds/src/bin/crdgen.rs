//! Writes the CRD YAML of the deskvirt.io API to stdout, or to the file given as first argument.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let yaml = deskvirt_crds::crds_yaml()?;
    match std::env::args().nth(1) {
        Some(path) => std::fs::write(path, yaml)?,
        None => print!("{yaml}"),
    }
    Ok(())
}
