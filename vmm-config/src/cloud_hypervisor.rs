//! Cloud Hypervisor (v52+) rendering with `--generic-vhost-user`.
//!
//! `config_size` is deliberately not rendered: Cloud Hypervisor's generic
//! vhost-user device asks the backend for its config space through the
//! vhost-user `CONFIG` protocol feature instead.

use crate::{path_str, Accel, ConfigError, VmConfig};

/// Characters Cloud Hypervisor's option parser treats specially in a value
/// and that it offers no escape for.
const UNSUPPORTED_VALUE_CHARS: [char; 4] = [',', '[', ']', '"'];

/// Renders `cfg`, which the caller has already validated.
pub(crate) fn render(cfg: &VmConfig) -> Result<Vec<String>, ConfigError> {
    if cfg.accel == Accel::Tcg {
        return Err(ConfigError::CloudHypervisorNeedsKvm);
    }
    if let Some(port) = cfg.virtio_serial.first() {
        return Err(ConfigError::CloudHypervisorVirtioSerialUnsupported {
            port: port.port_ref(0),
            name: port.name.clone(),
        });
    }
    for (index, dev) in cfg.vhost_user.iter().enumerate() {
        if let Some(value) = dev.reconnect_ms {
            return Err(ConfigError::CloudHypervisorReconnectUnsupported {
                device: dev.device_ref(index),
                value,
            });
        }
        if let Some(ch) = path_str(&dev.socket)
            .chars()
            .find(|c| UNSUPPORTED_VALUE_CHARS.contains(c))
        {
            return Err(ConfigError::CloudHypervisorUnsupportedSocketChar {
                device: dev.device_ref(index),
                path: dev.socket.clone(),
                ch,
            });
        }
    }

    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| (*s).to_owned()));

    push(&["--cpus", &format!("boot={}", cfg.vcpus)]);
    // Guest RAM must be shared so the vhost-user backend can map it.
    push(&["--memory", &format!("size={}M,shared=on", cfg.memory_mib)]);
    push(&["--kernel", path_str(&cfg.kernel)]);
    if let Some(initramfs) = &cfg.initramfs {
        push(&["--initramfs", path_str(initramfs)]);
    }
    push(&["--cmdline", &cfg.cmdline]);
    push(&["--serial", "tty", "--console", "off"]);

    for dev in &cfg.vhost_user {
        let sizes: Vec<String> = dev.queue_sizes.iter().map(u16::to_string).collect();
        push(&[
            "--generic-vhost-user",
            &format!(
                "socket={},device_type={},queue_sizes=[{}],id={}",
                path_str(&dev.socket),
                dev.virtio_id,
                sizes.join(","),
                dev.id
            ),
        ]);
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use crate::{Accel, ConfigError, VhostUserDevice, VmConfig, LAB_CONFIG_TOML};

    fn lab_kvm() -> VmConfig {
        VmConfig::from_toml_str(LAB_CONFIG_TOML)
            .unwrap()
            .with_accel(Accel::Kvm)
    }

    fn argv(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn lab_config_full_argv() {
        assert_eq!(
            lab_kvm().cloud_hypervisor_args().unwrap(),
            argv(&[
                "--cpus",
                "boot=1",
                "--memory",
                "size=256M,shared=on",
                "--kernel",
                "/lab/vmlinuz",
                "--initramfs",
                "/lab/initramfs.cpio",
                "--cmdline",
                "console=ttyS0 panic=-1 no_timer_check printk.time=1",
                "--serial",
                "tty",
                "--console",
                "off",
                "--generic-vhost-user",
                "socket=/lab/vu.sock,device_type=21,queue_sizes=[256,256],id=vu0",
            ])
        );
    }

    #[test]
    fn lab_config_as_shipped_is_tcg_and_rejected() {
        let cfg = VmConfig::from_toml_str(LAB_CONFIG_TOML).unwrap();
        let err = cfg.cloud_hypervisor_args().unwrap_err();
        assert!(
            matches!(err, ConfigError::CloudHypervisorNeedsKvm),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "accel \"tcg\" cannot be used with Cloud Hypervisor: Cloud Hypervisor has no \
             software emulation (TCG); it needs KVM: set accel = \"kvm\" on a host with \
             usable /dev/kvm, or use QEMU"
        );
    }

    #[test]
    fn mixed_queue_sizes_render_per_queue() {
        let mut cfg = lab_kvm()
            .with_vcpus(2)
            .with_memory_mib(1024)
            .with_device(VhostUserDevice::new("vu1", "/lab/vu1.sock", 1, [64]));
        cfg.initramfs = None;
        cfg.vhost_user[0].queue_sizes = vec![256, 1024, 32768];
        assert_eq!(
            cfg.cloud_hypervisor_args().unwrap(),
            argv(&[
                "--cpus",
                "boot=2",
                "--memory",
                "size=1024M,shared=on",
                "--kernel",
                "/lab/vmlinuz",
                "--cmdline",
                "console=ttyS0 panic=-1 no_timer_check printk.time=1",
                "--serial",
                "tty",
                "--console",
                "off",
                "--generic-vhost-user",
                "socket=/lab/vu.sock,device_type=21,queue_sizes=[256,1024,32768],id=vu0",
                "--generic-vhost-user",
                "socket=/lab/vu1.sock,device_type=1,queue_sizes=[64],id=vu1",
            ])
        );
    }

    #[test]
    fn config_size_is_not_rendered() {
        let mut cfg = lab_kvm();
        cfg.vhost_user[0].config_size = 24;
        let args = cfg.cloud_hypervisor_args().unwrap();
        assert_eq!(args, lab_kvm().cloud_hypervisor_args().unwrap());
        assert!(args.iter().all(|a| !a.contains("config")));
    }

    #[test]
    fn reconnect_ms_is_rejected() {
        let mut cfg = lab_kvm();
        cfg.vhost_user[0].reconnect_ms = Some(250);
        let err = cfg.cloud_hypervisor_args().unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::CloudHypervisorReconnectUnsupported { value: 250, .. }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        for needle in [
            "vhost_user[0] (vu0)",
            "reconnect_ms = 250",
            "Cloud Hypervisor",
        ] {
            assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
        }
    }

    #[test]
    fn comma_in_socket_path_is_rejected() {
        let mut cfg = lab_kvm();
        cfg.vhost_user[0].socket = "/run/a,b.sock".into();
        // QEMU can carry it (escaped as ",,"), so only Cloud Hypervisor refuses.
        cfg.qemu_args().unwrap();
        let err = cfg.cloud_hypervisor_args().unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::CloudHypervisorUnsupportedSocketChar { ch: ',', .. }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        for needle in ["vhost_user[0] (vu0)", "/run/a,b.sock", "','"] {
            assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
        }
    }

    #[test]
    fn virtio_serial_ports_are_refused_naming_the_limitation() {
        let cfg = lab_kvm().with_serial_port(crate::VirtioSerialPort::new(
            "vs0",
            "/lab/run/bench.sock",
            "vdevlab.bench",
        ));
        cfg.qemu_args().unwrap();
        let err = cfg.cloud_hypervisor_args().unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::CloudHypervisorVirtioSerialUnsupported { .. }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        for needle in [
            "virtio_serial[0] (vs0)",
            "Cloud Hypervisor",
            "--console",
            "VIRTIO_CONSOLE_F_MULTIPORT",
            "vdevlab.bench",
            "use QEMU",
        ] {
            assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
        }
    }
}
