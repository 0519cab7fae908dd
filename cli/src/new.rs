//! `vdevlab new device NAME`: scaffold a device model on the framework, its
//! driver and the scenarios that test them, which build and pass as
//! generated (`vdevlab user-test DIR`). The templates are in
//! `cli/templates/device/`, embedded here.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use vdevlab_lab::env::workspace_root;

/// Create a new project from a template.
#[derive(Debug, Args)]
pub struct NewArgs {
    #[command(subcommand)]
    what: NewWhat,
}

#[derive(Debug, Subcommand)]
enum NewWhat {
    /// A device model (Rust, on vdevlab-device-core), its Linux driver and
    /// a vdevlab.toml with passing scenarios, in DIR/NAME.
    Device {
        /// The device's name: lowercase letters, digits and '_', at most 12,
        /// starting with a letter (the module, /dev/NAME0, NAME-device).
        name: String,
        /// The folder to create the project in (default: the current one).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The virtio device id (1..=41: QEMU's generic device knows no
        /// higher; the lab's qw device uses 21, the sensor 10).
        #[arg(long, default_value_t = 35)]
        virtio_id: u16,
    },
}

/// (template, path in the project; `NAME` is replaced by the name).
const TEMPLATES: &[(&str, &str)] = &[
    (include_str!("../templates/device/README.md"), "README.md"),
    (
        include_str!("../templates/device/vdevlab.toml"),
        "vdevlab.toml",
    ),
    (include_str!("../templates/device/gitignore"), ".gitignore"),
    (
        include_str!("../templates/device/device/Cargo.toml"),
        "device/Cargo.toml",
    ),
    (
        include_str!("../templates/device/device/src/main.rs"),
        "device/src/main.rs",
    ),
    (
        include_str!("../templates/device/device/src/lib.rs"),
        "device/src/lib.rs",
    ),
    (
        include_str!("../templates/device/driver/Kbuild"),
        "driver/Kbuild",
    ),
    (
        include_str!("../templates/device/driver/Makefile"),
        "driver/Makefile",
    ),
    (
        include_str!("../templates/device/driver/driver.c"),
        "driver/NAME.c",
    ),
];

/// Whether `name` can name a device, a module, a crate and a device node.
fn check_name(name: &str) -> Result<()> {
    let ok = name.len() <= 12
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        bail!(
            "device name {name:?}: use lowercase letters, digits and '_', at most 12, \
             starting with a letter (e.g. mydev)"
        );
    }
    Ok(())
}

/// `my_dev` -> `MyDev`.
fn camel(name: &str) -> String {
    name.split('_')
        .map(|part| {
            let mut c = part.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// Render the templates for `name` into `dest` (which must not exist).
pub fn generate(name: &str, dest: &Path, virtio_id: u16) -> Result<Vec<PathBuf>> {
    check_name(name)?;
    if !(1..=41).contains(&virtio_id) {
        bail!("--virtio-id {virtio_id}: QEMU's generic vhost-user device takes 1..=41");
    }
    if dest.exists() {
        bail!(
            "{} exists already; pick another name or --dir",
            dest.display()
        );
    }
    let root = workspace_root();
    let vars = [
        ("{{name}}", name.to_string()),
        ("{{Name}}", camel(name)),
        ("{{NAME}}", name.to_uppercase()),
        ("{{crate}}", format!("{name}_device")),
        (
            "{{core_path}}",
            root.join("device-model/core").display().to_string(),
        ),
        ("{{vdevlab}}", root.display().to_string()),
        ("{{dir}}", dest.display().to_string()),
        ("{{virtio_id}}", virtio_id.to_string()),
    ];
    let mut written = Vec::new();
    for (template, path) in TEMPLATES {
        let mut text = template.to_string();
        for (k, v) in &vars {
            text = text.replace(k, v);
        }
        let out = dest.join(path.replace("NAME", name));
        std::fs::create_dir_all(out.parent().context("no parent")?)?;
        std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
        written.push(out);
    }
    // The lab's own lock file: the device builds with the crate versions
    // the framework is tested with (and from the local registry cache).
    let lock = dest.join("device/Cargo.lock");
    std::fs::copy(root.join("Cargo.lock"), &lock).context("copying Cargo.lock")?;
    written.push(lock);
    Ok(written)
}

/// Run `vdevlab new`.
pub fn run(args: NewArgs) -> Result<bool> {
    let NewWhat::Device {
        name,
        dir,
        virtio_id,
    } = args.what;
    let dest = std::path::absolute(dir.join(&name))?;
    let files = generate(&name, &dest, virtio_id)?;
    println!("created {} ({} files):", dest.display(), files.len());
    for f in &files {
        println!("  {}", f.strip_prefix(&dest).unwrap_or(f).display());
    }
    let vdevlab = workspace_root().join("vdevlab");
    println!("\nnext:");
    println!(
        "  cargo test --manifest-path {}/device/Cargo.toml   # the device's unit tests",
        dest.display()
    );
    println!(
        "  {} user-test {}   # device, driver and scenarios in a real guest",
        vdevlab.display(),
        dest.display()
    );
    println!(
        "  {} up --project {}   # a shell in the guest",
        vdevlab.display(),
        dest.display()
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["mydev", "a", "dev_2", "abcdefghijkl"] {
            check_name(ok).unwrap();
        }
        for bad in [
            "",
            "MyDev",
            "2dev",
            "my-dev",
            "dev_",
            "abcdefghijklm",
            "a b",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(camel("my_dev2"), "MyDev2");
    }

    #[test]
    fn templates_render_without_leftovers() {
        let dir = std::env::temp_dir().join(format!("vdevlab-new-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files = generate("tdev", &dir.join("tdev"), 35).unwrap();
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(
                !text.contains("{{"),
                "{}: a placeholder is left",
                f.display()
            );
        }
        let c = std::fs::read_to_string(dir.join("tdev/driver/tdev.c")).unwrap();
        assert!(c.contains("static unsigned int virtio_id = 35;"));
        assert!(c.contains("struct tdev {"));
        let lib = std::fs::read_to_string(dir.join("tdev/device/src/lib.rs")).unwrap();
        assert!(lib.contains("impl VirtioDevice for TdevDevice"));
        assert!(
            generate("tdev", &dir.join("tdev"), 35).is_err(),
            "no overwrite"
        );
        assert!(generate("tdev", &dir.join("x"), 99).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
