//! Everything a lab boot needs, built from this workspace: the backend
//! binary, the static guest programs, the guest driver module (for the lab
//! kernel) and the initramfs that holds them.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::env::{in_root_script, target_dir, workspace_root, LabEnv};

/// What a boot needs.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// The `vdevlab-device` backend binary.
    pub device_bin: PathBuf,
    /// The static `vdevlab-guest` binary.
    pub guest_bin: PathBuf,
    /// The driver module built for the lab kernel.
    pub driver_ko: PathBuf,
    /// The driver build's log (compiler output).
    pub driver_build_log: String,
    /// The initramfs (uncompressed newc cpio).
    pub initramfs: PathBuf,
    /// The folder holding the artifacts (bound into the VMM's root).
    pub dir: PathBuf,
}

/// Where artifacts are built: `target/lab/`.
pub fn lab_dir() -> PathBuf {
    target_dir().join("lab")
}

fn step(msg: &str) {
    eprintln!("[vdevlab] {msg}");
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
    let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
    log.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{what} failed ({}):\n{log}", out.status);
    }
    Ok(log)
}

/// Build everything (incrementally) and return where it is. Parallel callers
/// (test processes) are serialised by a lock file.
pub fn prepare(env: &LabEnv) -> Result<Artifacts> {
    let dir = lab_dir();
    fs::create_dir_all(&dir)?;
    let lock = File::create(dir.join(".prepare.lock"))?;
    lock.lock().context("locking target/lab")?;

    step("building the backend (vdevlab-device)");
    let profile_dir = target_dir().join("debug");
    run(
        cargo().current_dir(workspace_root()).args([
            "build",
            "--quiet",
            "-p",
            "vdevlab-device",
            "--bin",
            "vdevlab-device",
        ]),
        "cargo build -p vdevlab-device",
    )?;
    let device_bin = profile_dir.join("vdevlab-device");

    step("building the static guest programs (vdevlab-guest)");
    let guest_target = target_dir().join("guest");
    run(
        cargo()
            .current_dir(workspace_root())
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args(["build", "--quiet", "--release", "-p", "vdevlab-guest"])
            .args(["--target", "x86_64-unknown-linux-gnu", "--target-dir"])
            .arg(&guest_target),
        "cargo build -p vdevlab-guest (static)",
    )?;
    let guest_bin = guest_target.join("x86_64-unknown-linux-gnu/release/vdevlab-guest");

    step(&format!(
        "building the guest driver for {}",
        env.kernel_release
    ));
    let (driver_ko, driver_build_log) = build_driver(env, &dir)?;

    step("packing the initramfs");
    let initramfs = dir.join(format!("initramfs-{}.cpio", env.kernel_release));
    write_initramfs(
        &initramfs,
        &[
            (
                "init",
                0o755,
                include_bytes!("../../images/init.sh").to_vec(),
            ),
            ("bin/busybox", 0o755, read(&env.busybox)?),
            ("bin/vdevlab-guest", 0o755, read(&guest_bin)?),
            ("lib/modules/vdevlab_qw.ko", 0o644, read(&driver_ko)?),
        ],
    )?;
    Ok(Artifacts {
        device_bin,
        guest_bin,
        driver_ko,
        driver_build_log,
        initramfs,
        dir,
    })
}

fn read(path: &Path) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(buf)
}

/// Build `guest-driver/` out of tree against the lab kernel's headers,
/// inside the lab root (gcc and kbuild of the kernel's own series), W=1.
fn build_driver(env: &LabEnv, dir: &Path) -> Result<(PathBuf, String)> {
    let build = dir.join(format!("driver-{}", env.kernel_release));
    fs::create_dir_all(&build)?;
    let src = workspace_root().join("guest-driver");
    for entry in fs::read_dir(&src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if entry.file_type()?.is_file()
            && (name.ends_with(".c")
                || name.ends_with(".h")
                || name == "Kbuild"
                || name == "Makefile")
        {
            copy_if_changed(&entry.path(), &build.join(&*name))?;
        }
    }
    if src.join("include").is_dir() {
        copy_tree(&src.join("include"), &build.join("include"))?;
    }
    let log = run(
        Command::new(in_root_script())
            .arg(&env.root)
            .arg(format!("{}:/build", build.display()))
            .arg("--")
            .args(["make", "-C"])
            .arg(&env.kernel_headers)
            .args(["M=/build", "W=1", "modules"]),
        "building guest-driver (make W=1 modules, in the lab root)",
    )?;
    Ok((build.join("vdevlab_qw.ko"), log))
}

/// Copy keeping mtimes stable for unchanged files, so make rebuilds only
/// what changed.
fn copy_if_changed(from: &Path, to: &Path) -> Result<()> {
    let new = read(from)?;
    if fs::read(to).ok().as_deref() != Some(&new[..]) {
        fs::write(to, new).with_context(|| format!("writing {}", to.display()))?;
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else {
            copy_if_changed(&entry.path(), &dest)?;
        }
    }
    Ok(())
}

/// Write a newc initramfs: the folders a busybox system needs, the console
/// device node (the kernel opens /dev/console for init before anything can
/// mount devtmpfs), and the given files.
pub fn write_initramfs(path: &Path, files: &[(&str, u32, Vec<u8>)]) -> Result<()> {
    use cpio::newc::{Builder, ModeFileType};
    let tmp = path.with_extension("cpio.tmp");
    let mut out = std::io::BufWriter::new(File::create(&tmp)?);
    let mut ino = 1;
    let mut next = || {
        ino += 1;
        ino
    };
    for d in [
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib",
        "lib/modules",
        "usr",
        "usr/bin",
        "usr/sbin",
    ] {
        out = Builder::new(d)
            .ino(next())
            .mode(0o755)
            .set_mode_file_type(ModeFileType::Directory)
            .nlink(2)
            .write(out, 0)
            .finish()?;
    }
    out = Builder::new("dev/console")
        .ino(next())
        .mode(0o600)
        .set_mode_file_type(ModeFileType::Char)
        .rdev_major(5)
        .rdev_minor(1)
        .nlink(1)
        .write(out, 0)
        .finish()?;
    for (name, mode, data) in files {
        let size = u32::try_from(data.len()).context("initramfs file over 4 GiB")?;
        let mut w = Builder::new(name)
            .ino(next())
            .mode(*mode)
            .set_mode_file_type(ModeFileType::Regular)
            .nlink(1)
            .write(out, size);
        w.write_all(data)?;
        out = w.finish()?;
    }
    let out = cpio::newc::trailer(out)?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initramfs_holds_console_and_files() {
        let dir = std::env::temp_dir().join(format!("vdevlab-cpio-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.cpio");
        write_initramfs(&path, &[("init", 0o755, b"#!/bin/sh\n".to_vec())]).unwrap();
        let mut f = File::open(&path).unwrap();
        let mut names = Vec::new();
        loop {
            let r = cpio::NewcReader::new(f).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            names.push((
                r.entry().name().to_string(),
                r.entry().mode(),
                r.entry().rdev_major(),
            ));
            f = r.finish().unwrap();
        }
        assert!(names.contains(&("dev/console".into(), 0o020600, 5)));
        assert!(names.iter().any(|(n, m, _)| n == "init" && *m == 0o100755));
        fs::remove_dir_all(&dir).ok();
    }
}
