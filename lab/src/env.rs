//! The lab environment: where the toolchain, the guest kernels and the VMMs
//! are, provisioned by `images/provision.sh` and described by its `lab.env`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// The workspace root (where `Cargo.toml`, `images/` and `guest-driver/` are).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("lab/ has a parent")
        .to_path_buf()
}

/// The cargo target folder (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// Where run folders (consoles, logs, links to the sockets) and the run
/// records go: `VDEVLAB_RUNS_DIR` if set (relative to the current folder),
/// else `target/lab-runs/`. However deep it is, sockets live elsewhere
/// ([`crate::sockets`]).
pub fn runs_dir() -> PathBuf {
    match std::env::var_os("VDEVLAB_RUNS_DIR").filter(|d| !d.is_empty()) {
        Some(d) => {
            std::path::absolute(PathBuf::from(d)).unwrap_or_else(|_| target_dir().join("lab-runs"))
        }
        None => target_dir().join("lab-runs"),
    }
}

/// How the lab's QEMU is started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuRuntime {
    /// A host QEMU that is new enough, run directly.
    Host(PathBuf),
    /// The trixie-backports QEMU, run inside the lab's Debian root.
    InRoot {
        /// The root folder.
        root: PathBuf,
        /// QEMU's path inside the root.
        qemu: PathBuf,
    },
}

/// Where a guest kernel's out-of-tree modules are built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildPlace {
    /// Inside one of the lab's Debian roots (the kernel's own compiler
    /// lives there); the headers path is inside that root, or under one of
    /// [`Kernel::bind`]'s folders.
    InRoot(PathBuf),
    /// On the host, with the host's compiler (`BUILD_ROOT=host` in a
    /// hand-written lab.env; provisioning never writes it); the headers
    /// path is a host path.
    Host,
}

/// One guest kernel of the matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The series' short name: `trixie`, `bookworm`, `lab` (the trimmed
    /// kernel of `images/lab-kernel.sh`), its race-detector variants
    /// `lockdep` and `kcsan` (`images/lab-kernel.sh --variant ...`) or
    /// `debug`. Test names and the artifacts use it.
    pub name: String,
    /// `uname -r` in the guest, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// The kernel image (vmlinuz), host path.
    pub image: PathBuf,
    /// The kernel headers' kbuild folder (`make -C` target), a path inside
    /// [`Kernel::build`]'s root or on the host.
    pub headers: PathBuf,
    /// Where the driver is built for this kernel.
    pub build: BuildPlace,
    /// Host folders bound into the build root at their own path for the
    /// build (a kernel tree in the cache, such as the lab kernel's).
    pub bind: Vec<PathBuf>,
    /// Build with sparse (`C=1`): Debian's sparse understands 6.1's and
    /// 6.12's headers, not 7.3's (guest-driver/README.md).
    pub sparse: bool,
    /// Modules to load before the driver, in dependency order (host paths
    /// of `.ko` files); e.g. virtio and virtio_pci where they are modular.
    pub preload: Vec<PathBuf>,
}

impl Kernel {
    /// The module names of [`Kernel::preload`] (`virtio_ring`, ...).
    pub fn preload_names(&self) -> Vec<String> {
        self.preload
            .iter()
            .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .collect()
    }
}

/// The default guest kernel's name.
pub const DEFAULT_KERNEL: &str = "trixie";

/// The provisioned lab.
#[derive(Debug, Clone)]
pub struct LabEnv {
    /// The Debian trixie root with QEMU, kernel headers and compilers.
    pub root: PathBuf,
    /// How to start QEMU.
    pub qemu: QemuRuntime,
    /// `qemu-system-x86_64 --version`, first line.
    pub qemu_version: String,
    /// The guest kernels, the default ([`DEFAULT_KERNEL`]) first.
    pub kernels: Vec<Kernel>,
    /// busybox (static), host path.
    pub busybox: PathBuf,
}

impl LabEnv {
    /// The default guest kernel (trixie).
    pub fn default_kernel(&self) -> &Kernel {
        &self.kernels[0]
    }

    /// The guest kernel named `name` (`trixie`, `bookworm`, `lab`, ...).
    pub fn kernel(&self, name: &str) -> Result<&Kernel> {
        self.kernels
            .iter()
            .find(|k| k.name == name)
            .with_context(|| {
                format!(
                    "no guest kernel '{name}' in the lab (provisioned: {}); \
                 provision it with VDEVLAB_KERNELS unset or listing it",
                    self.kernel_names().join(", ")
                )
            })
    }

    /// The provisioned kernels' names, default first.
    pub fn kernel_names(&self) -> Vec<&str> {
        self.kernels.iter().map(|k| k.name.as_str()).collect()
    }
}

/// The folder that `images/provision.sh` fills.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VDEVLAB_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("vdevlab")
}

/// The in-root helper script.
pub fn in_root_script() -> PathBuf {
    workspace_root().join("images/in-root.sh")
}

static PROVISIONED: OnceLock<Result<LabEnv, String>> = OnceLock::new();

impl LabEnv {
    /// Provision the lab (idempotent; seconds when cached) and load it. Runs
    /// once per process; `images/provision.sh` itself serialises parallel
    /// callers with a lock. Its progress goes to this process's stderr.
    pub fn provision() -> Result<LabEnv> {
        PROVISIONED
            .get_or_init(|| Self::provision_now().map_err(|e| format!("{e:#}")))
            .clone()
            .map_err(anyhow::Error::msg)
    }

    fn provision_now() -> Result<LabEnv> {
        // A cache provisioned elsewhere (another checkout's, a shared one
        // with kernels this checkout's provision.sh does not know): use it
        // as it is, without touching it.
        if std::env::var_os("VDEVLAB_PROVISION").is_some_and(|v| v == "0") {
            return Self::load(&cache_dir());
        }
        let script = workspace_root().join("images/provision.sh");
        let status = Command::new("bash")
            .arg(&script)
            .env("VDEVLAB_CACHE", cache_dir())
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        if !status.success() {
            bail!(
                "{} failed ({status}); its last lines above say why",
                script.display()
            );
        }
        Self::load(&cache_dir())
    }

    /// Load `lab.env` from a provisioned cache folder.
    pub fn load(cache: &Path) -> Result<LabEnv> {
        let path = cache.join("lab.env");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (run images/provision.sh as root first)",
                path.display()
            )
        })?;
        let vars: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let get = |k: &str| -> Result<String> {
            vars.get(k).map(|v| v.to_string()).with_context(|| {
                format!("{} lacks {k}; re-run images/provision.sh", path.display())
            })
        };
        let root = PathBuf::from(get("VDEVLAB_ROOT")?);
        let in_root_qemu = PathBuf::from(get("VDEVLAB_QEMU")?);
        let (qemu, qemu_version) = match host_qemu() {
            Some((path, version)) => (QemuRuntime::Host(path), version),
            None => (
                QemuRuntime::InRoot {
                    root: root.clone(),
                    qemu: in_root_qemu,
                },
                get("VDEVLAB_QEMU_VERSION")?,
            ),
        };
        let kernels = match vars.get("VDEVLAB_KERNELS") {
            Some(names) => parse_kernels(names, &get)?,
            // A lab.env from before the matrix: the one trixie kernel.
            None => vec![Kernel {
                name: DEFAULT_KERNEL.to_string(),
                release: get("VDEVLAB_KERNEL_RELEASE")?,
                image: PathBuf::from(get("VDEVLAB_KERNEL")?),
                headers: PathBuf::from(get("VDEVLAB_KERNEL_HEADERS")?),
                build: BuildPlace::InRoot(root.clone()),
                bind: Vec::new(),
                sparse: false,
                preload: Vec::new(),
            }],
        };
        Ok(LabEnv {
            root,
            qemu,
            qemu_version,
            kernels,
            busybox: PathBuf::from(get("VDEVLAB_BUSYBOX")?),
        })
    }
}

/// The kernels listed in `VDEVLAB_KERNELS` (comma separated), each from its
/// `VDEVLAB_KERNEL_<NAME>_*` keys; the default kernel first.
fn parse_kernels(names: &str, get: &dyn Fn(&str) -> Result<String>) -> Result<Vec<Kernel>> {
    let mut kernels = Vec::new();
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let key = |field: &str| format!("VDEVLAB_KERNEL_{}_{field}", name.to_uppercase());
        let build = match get(&key("BUILD_ROOT"))?.as_str() {
            "" | "host" => BuildPlace::Host,
            root => BuildPlace::InRoot(PathBuf::from(root)),
        };
        kernels.push(Kernel {
            name: name.to_string(),
            release: get(&key("RELEASE"))?,
            image: PathBuf::from(get(&key("IMAGE"))?),
            headers: PathBuf::from(get(&key("HEADERS"))?),
            build,
            bind: get(&key("BIND"))
                .unwrap_or_default()
                .split(':')
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect(),
            sparse: get(&key("SPARSE")).is_ok_and(|v| v == "1"),
            preload: get(&key("MODULES"))?
                .split(':')
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect(),
        });
    }
    let Some(pos) = kernels.iter().position(|k| k.name == DEFAULT_KERNEL) else {
        bail!("VDEVLAB_KERNELS={names} lacks the default kernel {DEFAULT_KERNEL}; re-run images/provision.sh");
    };
    let default = kernels.remove(pos);
    kernels.insert(0, default);
    Ok(kernels)
}

/// A host `qemu-system-x86_64` new enough to have `vhost-user-test-device-pci`
/// (QEMU 10.2+), if there is one. `VDEVLAB_QEMU=in-root` forces the lab's own.
fn host_qemu() -> Option<(PathBuf, String)> {
    if std::env::var("VDEVLAB_QEMU").as_deref() == Ok("in-root") {
        return None;
    }
    let qemu = std::env::var_os("VDEVLAB_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
    let out = Command::new(&qemu).arg("--version").output().ok()?;
    let version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()?
        .to_string();
    let (major, minor) = parse_qemu_version(&version)?;
    if (major, minor) < (10, 2) {
        tracing::info!(%version, "host QEMU too old for vhost-user-test-device-pci (10.2+ needed); using the lab's");
        return None;
    }
    Some((qemu, version))
}

/// `(major, minor)` from "QEMU emulator version 11.1.3 (Debian ...)".
pub fn parse_qemu_version(line: &str) -> Option<(u32, u32)> {
    let v = line.split("version ").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Why `/dev/kvm` cannot run the lab's guests, with the fix.
#[derive(Debug)]
pub enum KvmProblem {
    /// No `/dev/kvm` at all.
    Missing,
    /// `/dev/kvm` is PVM (`kvm_pvm`), which boots only PVM-built kernels.
    Pvm,
    /// `/dev/kvm` exists but this user cannot open it.
    NoAccess(std::io::Error),
}

impl std::fmt::Display for KvmProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvmProblem::Missing => write!(f, "no /dev/kvm on this host"),
            KvmProblem::Pvm => write!(f, "/dev/kvm is PVM (kvm_pvm loaded): it only runs PVM-built guest kernels, and stock kernels hang at boot"),
            KvmProblem::NoAccess(e) => write!(f, "cannot open /dev/kvm: {e}"),
        }
    }
}

impl KvmProblem {
    /// What to do about it.
    pub fn fix(&self) -> &'static str {
        match self {
            KvmProblem::Missing => "enable virtualization (VT-x/AMD-V) in the firmware and load the module (sudo modprobe kvm_intel, or kvm_amd); in a VM, enable nested virtualization",
            KvmProblem::Pvm => "none on this host: its KVM cannot boot stock kernels; use a host with hardware KVM (the TCG cells run here)",
            KvmProblem::NoAccess(_) => "join the kvm group (sudo usermod -aG kvm $USER, then log in again), or give /dev/kvm mode 0666 with a udev rule",
        }
    }
}

/// Whether `/dev/kvm` can run the lab's guests.
pub fn kvm_status() -> Result<(), KvmProblem> {
    if !Path::new("/dev/kvm").exists() {
        return Err(KvmProblem::Missing);
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err(KvmProblem::Pvm);
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(KvmProblem::NoAccess)
}

/// [`kvm_status`] with the reason as text (for skip records).
pub fn kvm_usable() -> Result<(), String> {
    kvm_status().map_err(|p| p.to_string())
}

/// The oldest Cloud Hypervisor with generic vhost-user (`--generic-vhost-user`).
pub const CLOUD_HYPERVISOR_MIN: u32 = 52;

/// Where Cloud Hypervisor releases are (no distribution packages it).
const CLOUD_HYPERVISOR_RELEASES: &str =
    "https://github.com/cloud-hypervisor/cloud-hypervisor/releases";

/// The version line and `(major, minor)` of `cloud-hypervisor --version`'s
/// output: its line "cloud-hypervisor v53.0" (v53 adds a second line,
/// "Migration Protocol Versions: 0"; builds from a git tree print
/// "v53.0-dirty" or "v52.0-12-g1a2b3c4").
pub fn parse_cloud_hypervisor_version(output: &str) -> Option<(String, (u32, u32))> {
    let line = output
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("cloud-hypervisor"))?;
    let v = line.split_whitespace().nth(1)?.strip_prefix('v')?;
    let numeric: String = v
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = numeric.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    Some((line.to_string(), (major, minor)))
}

/// Why no Cloud Hypervisor can be used, with the fix.
#[derive(Debug)]
pub enum CloudHypervisorProblem {
    /// The binary could not be run.
    NotFound(PathBuf, std::io::Error),
    /// Its `--version` output names no version.
    Unrecognised(PathBuf, String),
    /// Older than [`CLOUD_HYPERVISOR_MIN`].
    TooOld(PathBuf, String),
}

impl std::fmt::Display for CloudHypervisorProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloudHypervisorProblem::NotFound(bin, e) => {
                write!(f, "no Cloud Hypervisor ({}: {e})", bin.display())
            }
            CloudHypervisorProblem::Unrecognised(bin, out) => write!(
                f,
                "{} --version printed no 'cloud-hypervisor vN.M' line ({:?})",
                bin.display(),
                out.lines().next().unwrap_or("")
            ),
            CloudHypervisorProblem::TooOld(bin, line) => write!(
                f,
                "Cloud Hypervisor v{CLOUD_HYPERVISOR_MIN}+ needed for generic vhost-user; found '{line}' at {}",
                bin.display()
            ),
        }
    }
}

impl CloudHypervisorProblem {
    /// What to do about it.
    pub fn fix(&self) -> String {
        format!(
            "download cloud-hypervisor-static v{CLOUD_HYPERVISOR_MIN} or newer from {CLOUD_HYPERVISOR_RELEASES}, \
             make it executable and set VDEVLAB_CLOUD_HYPERVISOR=/path/to/it (or put it on PATH)"
        )
    }
}

/// The Cloud Hypervisor binary (`VDEVLAB_CLOUD_HYPERVISOR`, else
/// `cloud-hypervisor` on `PATH`) and its version line, if it is v52+.
pub fn cloud_hypervisor_status() -> Result<(PathBuf, String), CloudHypervisorProblem> {
    let bin = std::env::var_os("VDEVLAB_CLOUD_HYPERVISOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("cloud-hypervisor"));
    let out = match Command::new(&bin).arg("--version").output() {
        Ok(out) => out,
        Err(e) => return Err(CloudHypervisorProblem::NotFound(bin, e)),
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match parse_cloud_hypervisor_version(&text) {
        None => Err(CloudHypervisorProblem::Unrecognised(bin, text)),
        Some((line, (major, _))) if major < CLOUD_HYPERVISOR_MIN => {
            Err(CloudHypervisorProblem::TooOld(bin, line))
        }
        Some((line, _)) => Ok((bin, line)),
    }
}

/// [`cloud_hypervisor_status`] with the reason and the fix as one line of
/// text (for skip records and errors).
pub fn cloud_hypervisor() -> Result<(PathBuf, String), String> {
    cloud_hypervisor_status().map_err(|p| format!("{p}; {}", p.fix()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_hypervisor_versions_parse() {
        // v52, v53 (two lines), a build from a dirty tree, a git describe.
        assert_eq!(
            parse_cloud_hypervisor_version("cloud-hypervisor v52.0\n"),
            Some(("cloud-hypervisor v52.0".into(), (52, 0)))
        );
        assert_eq!(
            parse_cloud_hypervisor_version(
                "cloud-hypervisor v53.0\nMigration Protocol Versions: 0\n"
            ),
            Some(("cloud-hypervisor v53.0".into(), (53, 0)))
        );
        assert_eq!(
            parse_cloud_hypervisor_version("cloud-hypervisor v53.0-dirty\n").map(|v| v.1),
            Some((53, 0))
        );
        assert_eq!(
            parse_cloud_hypervisor_version("cloud-hypervisor v52.1-12-g1a2b3c4\n").map(|v| v.1),
            Some((52, 1))
        );
        assert_eq!(
            parse_cloud_hypervisor_version("cloud-hypervisor v41.0").map(|v| v.1),
            Some((41, 0))
        );
        assert_eq!(
            parse_cloud_hypervisor_version("Migration Protocol Versions: 0"),
            None
        );
        assert_eq!(parse_cloud_hypervisor_version(""), None);
    }

    #[test]
    fn cloud_hypervisor_reasons_are_one_line() {
        let too_old = CloudHypervisorProblem::TooOld(
            "/opt/ch".into(),
            parse_cloud_hypervisor_version(
                "cloud-hypervisor v41.0\nMigration Protocol Versions: 0",
            )
            .unwrap()
            .0,
        );
        let odd = CloudHypervisorProblem::Unrecognised("/opt/ch".into(), "a\nb\n".into());
        for p in [too_old, odd] {
            let text = format!("{p}; {}", p.fix());
            assert!(!text.contains('\n'), "{text:?}");
            assert!(text.contains("VDEVLAB_CLOUD_HYPERVISOR"), "{text}");
        }
    }

    #[test]
    fn qemu_versions_parse() {
        assert_eq!(
            parse_qemu_version("QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)"),
            Some((11, 1))
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2.15"),
            Some((7, 2))
        );
        assert_eq!(parse_qemu_version("nonsense"), None);
    }

    #[test]
    fn lab_env_lists_every_kernel_default_first() {
        let dir = std::env::temp_dir().join(format!("vdevlab-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("lab.env"),
            "VDEVLAB_ROOT=/r\nVDEVLAB_QEMU=/usr/bin/qemu-system-x86_64\n\
             VDEVLAB_QEMU_VERSION=QEMU emulator version 11.1.3\nVDEVLAB_BUSYBOX=/r/bb\n\
             VDEVLAB_KERNELS=bookworm,trixie\n\
             VDEVLAB_KERNEL_TRIXIE_RELEASE=7.3.4\nVDEVLAB_KERNEL_TRIXIE_IMAGE=/k/7/vmlinuz\n\
             VDEVLAB_KERNEL_TRIXIE_HEADERS=/usr/src/h7\nVDEVLAB_KERNEL_TRIXIE_BUILD_ROOT=/r\n\
             VDEVLAB_KERNEL_TRIXIE_MODULES=\n\
             VDEVLAB_KERNEL_BOOKWORM_RELEASE=6.1.0-56-amd64\n\
             VDEVLAB_KERNEL_BOOKWORM_IMAGE=/k/6/vmlinuz\n\
             VDEVLAB_KERNEL_BOOKWORM_HEADERS=/usr/src/h6\nVDEVLAB_KERNEL_BOOKWORM_BUILD_ROOT=/b\n\
             VDEVLAB_KERNEL_BOOKWORM_SPARSE=1\nVDEVLAB_KERNEL_BOOKWORM_BIND=/c/lk:/c/x\n\
             VDEVLAB_KERNEL_BOOKWORM_MODULES=/k/6/m/virtio_ring.ko:/k/6/m/virtio.ko\n",
        )
        .unwrap();
        let env = LabEnv::load(&dir).unwrap();
        assert_eq!(env.kernel_names(), ["trixie", "bookworm"]);
        assert_eq!(env.default_kernel().release, "7.3.4");
        assert_eq!(env.default_kernel().build, BuildPlace::InRoot("/r".into()));
        let bw = env.kernel("bookworm").unwrap();
        assert_eq!(bw.build, BuildPlace::InRoot("/b".into()));
        assert!(bw.sparse && !env.default_kernel().sparse);
        assert_eq!(bw.bind, [PathBuf::from("/c/lk"), PathBuf::from("/c/x")]);
        assert!(env.default_kernel().bind.is_empty());
        assert_eq!(bw.preload_names(), ["virtio_ring", "virtio"]);
        assert!(env.default_kernel().preload.is_empty());
        assert!(env.kernel("nope").is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
