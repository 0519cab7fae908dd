//! Everything a lab boot needs, built from this workspace: the backend
//! binary, the static guest programs, and for every guest kernel of the
//! matrix the guest driver module and an initramfs that holds them (with
//! the kernel's own modules the driver needs first, where virtio is modular).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::env::{in_root_script, target_dir, workspace_root, BuildPlace, Kernel, LabEnv};

/// What a boot needs.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// The `vdevlab-qw` backend binary.
    pub device_bin: PathBuf,
    /// The static `vdevlab-guest` binary.
    pub guest_bin: PathBuf,
    /// Per guest kernel: the driver and the initramfs, in the order of
    /// [`LabEnv::kernels`] (the default kernel first).
    pub kernels: Vec<KernelArtifacts>,
    /// The folder holding the artifacts (bound into the VMM's root).
    pub dir: PathBuf,
}

/// What one guest kernel's boots need.
#[derive(Debug, Clone)]
pub struct KernelArtifacts {
    /// The kernel's name ([`Kernel::name`]).
    pub kernel: String,
    /// Its release.
    pub release: String,
    /// The driver module built for this kernel.
    pub driver_ko: PathBuf,
    /// The driver build's log (compiler output).
    pub driver_build_log: String,
    /// The same log on disk: `target/lab/driver-<release>.log`.
    pub driver_build_log_path: PathBuf,
    /// The initramfs (uncompressed newc cpio) for this kernel.
    pub initramfs: PathBuf,
}

impl Artifacts {
    /// The artifacts for the kernel named `name`.
    pub fn for_kernel(&self, name: &str) -> Result<&KernelArtifacts> {
        self.kernels
            .iter()
            .find(|k| k.kernel == name)
            .with_context(|| format!("no artifacts were built for the guest kernel '{name}'"))
    }

    /// The default kernel's artifacts.
    pub fn default_kernel(&self) -> &KernelArtifacts {
        &self.kernels[0]
    }
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

/// Run `cmd`; its exit status and its stdout then stderr as one log.
fn output_log(cmd: &mut Command, what: &str) -> Result<(std::process::ExitStatus, String)> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
    let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
    log.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status, log))
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let (status, log) = output_log(cmd, what)?;
    if !status.success() {
        bail!("{what} failed ({status}):\n{log}");
    }
    Ok(log)
}

/// Build the backend with the release profile (`target/release/`) and
/// return the binary: what `vdevlab bench` measures, since a debug build's
/// costs would be ours only, not a user's.
pub fn release_device_bin() -> Result<PathBuf> {
    step("building the backend with the release profile (vdevlab-qw)");
    run(
        cargo().current_dir(workspace_root()).args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "vdevlab-qw",
            "--bin",
            "vdevlab-qw",
        ]),
        "cargo build --release -p vdevlab-qw",
    )?;
    Ok(target_dir().join("release").join("vdevlab-qw"))
}

/// Build everything (incrementally) and return where it is. Parallel callers
/// (test processes) are serialised by a lock file.
pub fn prepare(env: &LabEnv) -> Result<Artifacts> {
    let dir = lab_dir();
    fs::create_dir_all(&dir)?;
    let lock = File::create(dir.join(".prepare.lock"))?;
    lock.lock().context("locking target/lab")?;

    step("building the backend (vdevlab-qw)");
    let profile_dir = target_dir().join("debug");
    run(
        cargo().current_dir(workspace_root()).args([
            "build",
            "--quiet",
            "-p",
            "vdevlab-qw",
            "--bin",
            "vdevlab-qw",
        ]),
        "cargo build -p vdevlab-qw",
    )?;
    let device_bin = profile_dir.join("vdevlab-qw");

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

    let mut kernels = Vec::new();
    for kernel in &env.kernels {
        kernels.push(prepare_kernel(env, kernel, &dir, &guest_bin)?);
    }
    Ok(Artifacts {
        device_bin,
        guest_bin,
        kernels,
        dir,
    })
}

/// The driver and the initramfs for one guest kernel.
fn prepare_kernel(
    env: &LabEnv,
    kernel: &Kernel,
    dir: &Path,
    guest_bin: &Path,
) -> Result<KernelArtifacts> {
    step(&format!(
        "building the guest driver for {} ({}, {})",
        kernel.name,
        kernel.release,
        match &kernel.build {
            BuildPlace::InRoot(root) => format!(
                "in {}",
                root.file_name().unwrap_or_default().to_string_lossy()
            ),
            BuildPlace::Host => "on the host".to_string(),
        }
    ));
    let (driver_ko, driver_build_log, driver_build_log_path) = build_module(
        kernel,
        &workspace_root().join("guest-driver"),
        "vdevlab_qw",
        dir,
        "driver",
    )?;
    let driver = read(&driver_ko)?;
    check_module(kernel, "vdevlab_qw", &driver)?;

    step(&format!("packing the initramfs for {}", kernel.name));
    let initramfs = dir.join(format!("initramfs-{}.cpio", kernel.release));
    let mut files = vec![
        (
            "init".to_string(),
            0o755,
            include_bytes!("../../images/init.sh").to_vec(),
        ),
        ("bin/busybox".into(), 0o755, read(&env.busybox)?),
        ("bin/vdevlab-guest".into(), 0o755, read(guest_bin)?),
        ("lib/modules/vdevlab_qw.ko".into(), 0o644, driver),
    ];
    // The kernel's own modules the driver needs, and their load order for
    // init.sh (empty where virtio is built in).
    let mut names = kernel.preload_names();
    for (path, name) in kernel.preload.iter().zip(&names) {
        files.push((format!("lib/modules/{name}.ko"), 0o644, read(path)?));
    }
    // Modules the benchmark needs (virtio_console), loaded after the
    // preloads where provision.sh put them next to those.
    for path in extra_modules(kernel) {
        let name = path.file_stem().unwrap_or_default().to_string_lossy();
        files.push((format!("lib/modules/{name}.ko"), 0o644, read(&path)?));
        names.push(name.into_owned());
    }
    let list: String = names.iter().map(|n| format!("{n}\n")).collect();
    files.push(("lib/modules/preload.list".into(), 0o644, list.into_bytes()));
    write_initramfs(&initramfs, &files)?;
    Ok(KernelArtifacts {
        kernel: kernel.name.clone(),
        release: kernel.release.clone(),
        driver_ko,
        driver_build_log,
        driver_build_log_path,
        initramfs,
    })
}

/// Kernel modules the benchmark's baseline needs, picked by name: the
/// virtio-serial driver (`virtio_console`). Where virtio is modular,
/// `images/provision.sh` puts them in the folder of the kernel's preloaded
/// modules; where it is built in (trixie), there is nothing to load.
pub const EXTRA_MODULES: &[&str] = &["virtio_console"];

/// The [`EXTRA_MODULES`] that were provisioned for `kernel` (host paths).
pub fn extra_modules(kernel: &Kernel) -> Vec<PathBuf> {
    let Some(dir) = kernel.preload.first().and_then(|p| p.parent()) else {
        return Vec::new();
    };
    EXTRA_MODULES
        .iter()
        .map(|m| dir.join(format!("{m}.ko")))
        .filter(|p| p.is_file() && !kernel.preload.contains(p))
        .collect()
}

/// The `key=value` strings of a module's `.modinfo` (NUL-separated; a scan
/// of the whole file, which is enough for the keys checked here).
fn modinfo<'a>(ko: &'a [u8], key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    ko.split(|&b| b == 0)
        .filter_map(|s| std::str::from_utf8(s).ok())
        .find_map(|s| s.strip_prefix(prefix.as_str()))
}

/// A driver module (`name`.ko) must be built for this kernel (vermagic) and
/// load with what the initramfs preloads (its `depends=`).
pub fn check_module(kernel: &Kernel, name: &str, ko: &[u8]) -> Result<()> {
    let vermagic = modinfo(ko, "vermagic").unwrap_or("");
    if vermagic.split_whitespace().next() != Some(kernel.release.as_str()) {
        bail!(
            "{name}.ko built for {} has vermagic '{vermagic}', not {}: wrong headers?",
            kernel.name,
            kernel.release
        );
    }
    let preload = kernel.preload_names();
    let missing: Vec<&str> = modinfo(ko, "depends")
        .unwrap_or("")
        .split(',')
        .filter(|d| !d.is_empty() && !preload.iter().any(|p| p == d))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{name}.ko for {} needs the modules {missing:?}, which the initramfs does not \
             load first (preloaded: {preload:?}); add them to VDEVLAB_BOOKWORM_MODULES and \
             re-run images/provision.sh",
            kernel.name
        );
    }
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(buf)
}

/// Build an out-of-tree module (the Kbuild folder `src`, making `name`.ko)
/// against `kernel`'s headers, W=1 (and C=1 where [`Kernel::sparse`]),
/// where the kernel's own compiler is: inside one of the lab's Debian roots
/// (trixie: gcc-14, for 7.3 and the lab kernel's 6.12; bookworm: gcc-12,
/// for 6.1). The build happens in a copy,
/// `dir/<label>-<release>/`. Returns the module, the build's log and where
/// the log is kept (`dir/<label>-<release>.log`). `guest-driver/` is built
/// this way (label `driver`), and so is a user's driver.
///
/// Every test process prepares the lab, and even a no-op kbuild run costs
/// seconds per kernel, so make only runs when the sources, the headers or
/// the build place changed since the last successful build (a stamp); the
/// log is then the one of the build that made the module.
pub fn build_module(
    kernel: &Kernel,
    src: &Path,
    name: &str,
    dir: &Path,
    label: &str,
) -> Result<(PathBuf, String, PathBuf)> {
    let build = dir.join(format!("{label}-{}", kernel.release));
    let ko = build.join(format!("{name}.ko"));
    let log_path = dir.join(format!("{label}-{}.log", kernel.release));
    let stamp_path = dir.join(format!("{label}-{}.stamp", kernel.release));
    fs::create_dir_all(&build)?;
    // Test processes build the same module at once (one per cell or test):
    // one builds, the others wait, then find its stamp. Released on drop.
    let lock = fs::File::create(dir.join(format!("{label}-{}.lock", kernel.release)))?;
    lock.lock()
        .with_context(|| format!("locking the {label} build for {}", kernel.release))?;
    let stamp = copy_sources(kernel, src, &build)?;
    if ko.exists() && fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) {
        if let Ok(log) = fs::read_to_string(&log_path) {
            return Ok((ko, log, log_path));
        }
    }
    let _ = fs::remove_file(&stamp_path);
    // A rebuild compiles everything again, so its log holds every warning
    // (and sparse's report) rather than only the changed files'.
    for entry in fs::read_dir(&build)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "o" || e == "ko") {
            let _ = fs::remove_file(path);
        }
    }

    let (mut cmd, what) = make_command(kernel, &build);
    // English compiler messages: the warning check looks for "warning:".
    cmd.env("LC_ALL", "C");
    let what = format!(
        "building {} for {} {} (make W=1 modules, {what})",
        src.display(),
        kernel.name,
        kernel.release
    );
    let (status, log) = output_log(&mut cmd, &what)?;
    fs::write(&log_path, &log).with_context(|| format!("writing {}", log_path.display()))?;
    if !status.success() {
        bail!(
            "{what} failed ({status}); log {}:\n{log}",
            log_path.display()
        );
    }
    if !ko.is_file() {
        bail!(
            "{what} made no {name}.ko (is obj-m in {}/Kbuild {name}.o?); log {}:\n{log}",
            src.display(),
            log_path.display()
        );
    }
    fs::write(&stamp_path, &stamp)?;
    Ok((ko, log, log_path))
}

/// Copy the module's sources (`.c`, `.h`, `.S`, Kbuild, Makefile and an
/// `include/` tree) into `build`, and return the build's stamp: a hash of
/// the sources, the build's place and flags, and the kernel headers.
fn copy_sources(kernel: &Kernel, src: &Path, build: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    // The build's place and flags too.
    hash.update(format!(
        "{:?}\n{:?}\n{:?}\nW=1 sparse={}\n",
        kernel.build, kernel.headers, kernel.bind, kernel.sparse
    ));
    let mut names = Vec::new();
    for entry in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file()
            && (name.ends_with(".c")
                || name.ends_with(".h")
                || name.ends_with(".S")
                || name == "Kbuild"
                || name == "Makefile")
        {
            names.push(name);
        }
    }
    names.sort();
    for name in &names {
        let data = copy_if_changed(&src.join(name), &build.join(name))?;
        hash.update(format!("{name} {}\n", data.len()));
        hash.update(&data);
    }
    if src.join("include").is_dir() {
        copy_tree(&src.join("include"), &build.join("include"), &mut hash)?;
    }
    // The headers as provisioned: their config and exported symbols.
    let headers_on_host = match &kernel.build {
        BuildPlace::InRoot(_) if kernel.bind.iter().any(|b| kernel.headers.starts_with(b)) => {
            kernel.headers.clone()
        }
        BuildPlace::InRoot(root) => {
            root.join(kernel.headers.strip_prefix("/").unwrap_or(&kernel.headers))
        }
        BuildPlace::Host => kernel.headers.clone(),
    };
    for f in [".config", "Module.symvers"] {
        if let Ok(m) = fs::metadata(headers_on_host.join(f)) {
            hash.update(format!("{f} {} {:?}\n", m.len(), m.modified().ok()));
        }
    }
    Ok(hex::encode(hash.finalize()))
}

/// The kbuild command for a module in `build` (W=1, sparse where the
/// kernel has it), and a description for messages.
fn make_command(kernel: &Kernel, build: &Path) -> (Command, String) {
    // C=1: sparse checks every file it compiles.
    let sparse = kernel.sparse.then_some("C=1");
    let (cmd, what) = match &kernel.build {
        BuildPlace::InRoot(root) => {
            let mut c = Command::new(in_root_script());
            c.arg(root);
            for b in &kernel.bind {
                c.arg(format!("{}:{}", b.display(), b.display()));
            }
            c.arg(format!("{}:/build", build.display()))
                .arg("--")
                .args(["make", "-C"])
                .arg(&kernel.headers)
                .args(["M=/build", "W=1"])
                .args(sparse)
                .arg("modules");
            (c, format!("in {}", root.display()))
        }
        BuildPlace::Host => {
            let mut c = Command::new("make");
            c.arg("-C")
                .arg(&kernel.headers)
                .arg(format!("M={}", build.display()))
                .arg("W=1")
                .args(sparse)
                .arg("modules");
            (c, "on the host".to_string())
        }
    };
    let what = if kernel.sparse {
        format!("{what}, with sparse")
    } else {
        what
    };
    (cmd, what)
}

/// Copy keeping mtimes stable for unchanged files, so make rebuilds only
/// what changed. Returns the contents.
fn copy_if_changed(from: &Path, to: &Path) -> Result<Vec<u8>> {
    let new = read(from)?;
    if fs::read(to).ok().as_deref() != Some(&new[..]) {
        fs::write(to, &new).with_context(|| format!("writing {}", to.display()))?;
    }
    Ok(new)
}

/// Copy a folder (as [`copy_if_changed`]), hashing names and contents.
fn copy_tree(from: &Path, to: &Path, hash: &mut sha2::Sha256) -> Result<()> {
    use sha2::Digest;
    fs::create_dir_all(to)?;
    let mut entries = fs::read_dir(from)?.collect::<std::io::Result<Vec<_>>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let dest = to.join(entry.file_name());
        hash.update(format!("{}\n", dest.display()));
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dest, hash)?;
        } else {
            hash.update(copy_if_changed(&entry.path(), &dest)?);
        }
    }
    Ok(())
}

/// Write a newc initramfs: the folders a busybox system needs, the console
/// device node (the kernel opens /dev/console for init before anything can
/// mount devtmpfs), and the given files.
pub fn write_initramfs<N: AsRef<str>>(path: &Path, files: &[(N, u32, Vec<u8>)]) -> Result<()> {
    let dirs = [
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
    ];
    write_newc(path, &dirs, true, files)
}

/// Write a newc archive of folders (parents first) and files, to be laid
/// over the lab's initramfs (see `BootSpec::overlays`): a folder that is
/// there already is kept, a file replaces the one there.
pub fn write_archive<D: AsRef<str>, N: AsRef<str>>(
    path: &Path,
    dirs: &[D],
    files: &[(N, u32, Vec<u8>)],
) -> Result<()> {
    write_newc(path, dirs, false, files)
}

fn write_newc<D: AsRef<str>, N: AsRef<str>>(
    path: &Path,
    dirs: &[D],
    console: bool,
    files: &[(N, u32, Vec<u8>)],
) -> Result<()> {
    use cpio::newc::{Builder, ModeFileType};
    let tmp = path.with_extension("cpio.tmp");
    let mut out = std::io::BufWriter::new(File::create(&tmp)?);
    let mut ino = 1;
    let mut next = || {
        ino += 1;
        ino
    };
    for d in dirs {
        out = Builder::new(d.as_ref())
            .ino(next())
            .mode(0o755)
            .set_mode_file_type(ModeFileType::Directory)
            .nlink(2)
            .write(out, 0)
            .finish()?;
    }
    if console {
        out = Builder::new("dev/console")
            .ino(next())
            .mode(0o600)
            .set_mode_file_type(ModeFileType::Char)
            .rdev_major(5)
            .rdev_minor(1)
            .nlink(1)
            .write(out, 0)
            .finish()?;
    }
    for (name, mode, data) in files {
        let size = u32::try_from(data.len()).context("initramfs file over 4 GiB")?;
        let mut w = Builder::new(name.as_ref())
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

/// `checkpatch.pl --strict` (provisioned from Debian's kernel source, in
/// the cache) on `files` of the folder `dir`, as the kernel's own tree would
/// run it on a patch's files (`--no-tree -f`, one finding per line with its
/// type: `--terse --show-types`). It runs inside the lab's trixie root (its
/// perl; nothing of the host's), `dir` bound in at its own path.
pub fn checkpatch(env: &LabEnv, dir: &Path, files: &[&str]) -> Result<std::process::Output> {
    let script = crate::env::cache_dir().join("checkpatch");
    let dir = std::path::absolute(dir)?;
    Command::new(in_root_script())
        .arg(&env.root)
        .arg(format!("{}:{}", script.display(), script.display()))
        .arg(format!("{}:{}", dir.display(), dir.display()))
        .args([
            "--",
            "sh",
            "-c",
            r#"cd "$1" && shift && exec perl "$@""#,
            "sh",
        ])
        .arg(&dir)
        .arg(script.join("checkpatch.pl"))
        .args(["--strict", "--no-tree", "--show-types", "--terse", "-f"])
        .args(files)
        .output()
        .with_context(|| format!("running checkpatch.pl on {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_must_match_the_kernel_and_its_preloads() {
        let kernel = |preload: &[&str]| Kernel {
            name: "bookworm".into(),
            release: "6.1.0-56-amd64".into(),
            image: "/k/vmlinuz".into(),
            headers: "/k/h".into(),
            build: BuildPlace::InRoot("/b".into()),
            bind: Vec::new(),
            sparse: true,
            preload: preload
                .iter()
                .map(|m| PathBuf::from(format!("/k/m/{m}.ko")))
                .collect(),
        };
        let ko = b"\x7fELF\0license=GPL\0depends=virtio_ring,virtio\0\
                   vermagic=6.1.0-56-amd64 SMP preempt mod_unload modversions \0";
        check_module(
            &kernel(&["virtio_ring", "virtio", "virtio_pci"]),
            "vdevlab_qw",
            ko,
        )
        .unwrap();
        let err = check_module(&kernel(&[]), "vdevlab_qw", ko)
            .unwrap_err()
            .to_string();
        assert!(err.contains("virtio_ring"), "{err}");
        let mut other = kernel(&["virtio_ring", "virtio"]);
        other.release = "7.3.4+deb13-amd64".into();
        assert!(check_module(&other, "vdevlab_qw", ko).is_err());
        // Built in (trixie): no dependencies, nothing to preload.
        let builtin = b"\0depends=\0vermagic=6.1.0-56-amd64 SMP\0";
        check_module(&kernel(&[]), "vdevlab_qw", builtin).unwrap();
    }

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
