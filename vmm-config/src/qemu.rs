//! QEMU (>= 10.2) rendering with `vhost-user-test-device-pci`.

use crate::{
    path_str, Accel, ConfigError, VmConfig, QEMU_MAX_QUEUE_SIZE, QEMU_MAX_VIRTIO_ID,
    VIRTIO_SERIAL_CONTROLLER_ID,
};

/// Escapes a value for QEMU's `key=value,...` option syntax: a literal
/// comma is written as `,,`.
fn escape_opt_value(value: &str) -> String {
    value.replace(',', ",,")
}

/// Renders `cfg`, which the caller has already validated.
pub(crate) fn render(cfg: &VmConfig) -> Result<Vec<String>, ConfigError> {
    // QEMU-specific checks first, so nothing is rendered for a config QEMU
    // would reject.
    for (index, dev) in cfg.vhost_user.iter().enumerate() {
        if dev.virtio_id > QEMU_MAX_VIRTIO_ID {
            return Err(ConfigError::QemuUnknownVirtioId {
                device: dev.device_ref(index),
                virtio_id: dev.virtio_id,
            });
        }
        let first = dev.queue_sizes[0];
        if dev.queue_sizes.iter().any(|&s| s != first) {
            return Err(ConfigError::QemuMixedQueueSizes {
                device: dev.device_ref(index),
                sizes: dev.queue_sizes.clone(),
            });
        }
        if first > QEMU_MAX_QUEUE_SIZE {
            return Err(ConfigError::QemuQueueSizeTooLarge {
                device: dev.device_ref(index),
                size: first,
            });
        }
    }

    let mem = cfg.memory_mib;
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| (*s).to_owned()));

    match cfg.accel {
        // Several vCPUs on several host threads (the default for x86 on
        // x86 hosts; said outright so a build that defaults otherwise
        // fails loudly instead of running the vCPUs one at a time).
        Accel::Tcg if cfg.vcpus > 1 => push(&["-accel", "tcg,thread=multi"]),
        Accel::Tcg => push(&["-accel", "tcg"]),
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
    }
    push(&["-m", &format!("{mem}M"), "-smp", &cfg.vcpus.to_string()]);
    // Guest RAM must be a shared memfd so the vhost-user backend can map it.
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-numa",
        "node,memdev=mem",
    ]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]);
    push(&["-kernel", path_str(&cfg.kernel)]);
    if let Some(initramfs) = &cfg.initramfs {
        push(&["-initrd", path_str(initramfs)]);
    }
    push(&["-append", &cfg.cmdline]);

    for dev in &cfg.vhost_user {
        let mut chardev = format!(
            "socket,id={},path={}",
            dev.id,
            escape_opt_value(path_str(&dev.socket))
        );
        if let Some(ms) = dev.reconnect_ms {
            chardev.push_str(&format!(",reconnect-ms={ms}"));
        }
        let mut device = format!(
            "vhost-user-test-device-pci,chardev={},virtio-id={},num_vqs={},vq_size={}",
            dev.id,
            dev.virtio_id,
            dev.queue_sizes.len(),
            dev.queue_sizes[0]
        );
        if dev.config_size > 0 {
            device.push_str(&format!(",config_size={}", dev.config_size));
        }
        push(&["-chardev", &chardev, "-device", &device]);
    }

    // Named virtio-serial ports: one controller after the vhost-user
    // devices (so their PCI slots do not move), QEMU listening on each
    // port's socket without waiting for a client.
    if !cfg.virtio_serial.is_empty() {
        push(&[
            "-device",
            &format!("virtio-serial-pci,id={VIRTIO_SERIAL_CONTROLLER_ID}"),
        ]);
    }
    for port in &cfg.virtio_serial {
        push(&[
            "-chardev",
            &format!(
                "socket,id={},path={},server=on,wait=off",
                port.id,
                escape_opt_value(path_str(&port.socket))
            ),
            "-device",
            &format!(
                "virtserialport,bus={VIRTIO_SERIAL_CONTROLLER_ID}.0,chardev={},name={}",
                port.id, port.name
            ),
        ]);
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use crate::{Accel, ConfigError, VhostUserDevice, VmConfig, LAB_CONFIG_TOML};

    fn lab() -> VmConfig {
        VmConfig::from_toml_str(LAB_CONFIG_TOML).unwrap()
    }

    fn argv(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    /// Value following the first occurrence of `flag`.
    fn value_of<'a>(args: &'a [String], flag: &str) -> &'a str {
        let i = args.iter().position(|a| a == flag).expect("flag present");
        &args[i + 1]
    }

    #[test]
    fn lab_config_full_argv() {
        assert_eq!(
            lab().qemu_args().unwrap(),
            argv(&[
                "-accel",
                "tcg",
                "-m",
                "256M",
                "-smp",
                "1",
                "-object",
                "memory-backend-memfd,id=mem,size=256M,share=on",
                "-numa",
                "node,memdev=mem",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
                "-kernel",
                "/lab/vmlinuz",
                "-initrd",
                "/lab/initramfs.cpio",
                "-append",
                "console=ttyS0 panic=-1 no_timer_check printk.time=1",
                "-chardev",
                "socket,id=vu0,path=/lab/vu.sock",
                "-device",
                "vhost-user-test-device-pci,chardev=vu0,virtio-id=21,num_vqs=2,vq_size=256,config_size=48",
            ])
        );
    }

    #[test]
    fn several_tcg_vcpus_ask_for_multi_threaded_tcg() {
        let cfg = VmConfig::new("/k").with_vcpus(2);
        let args = cfg.qemu_args().unwrap();
        assert_eq!(&args[..2], argv(&["-accel", "tcg,thread=multi"]));
        assert!(args.windows(2).any(|w| w == argv(&["-smp", "2"])));
    }

    #[test]
    fn kvm_adds_host_cpu_and_sizes_follow_config() {
        let cfg = VmConfig::new("/k")
            .with_cmdline("quiet")
            .with_memory_mib(2048)
            .with_vcpus(4)
            .with_accel(Accel::Kvm);
        assert_eq!(
            cfg.qemu_args().unwrap(),
            argv(&[
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-m",
                "2048M",
                "-smp",
                "4",
                "-object",
                "memory-backend-memfd,id=mem,size=2048M,share=on",
                "-numa",
                "node,memdev=mem",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
                "-kernel",
                "/k",
                "-append",
                "quiet",
            ])
        );
    }

    #[test]
    fn comma_in_socket_path_is_doubled_only_in_chardev() {
        let mut cfg = lab();
        cfg.kernel = "/lab/a,b/vmlinuz".into();
        cfg.vhost_user[0].socket = "/run/a,b/vu,0.sock".into();
        let args = cfg.qemu_args().unwrap();
        assert_eq!(
            value_of(&args, "-chardev"),
            "socket,id=vu0,path=/run/a,,b/vu,,0.sock"
        );
        // -kernel is its own argv element: no escaping.
        assert_eq!(value_of(&args, "-kernel"), "/lab/a,b/vmlinuz");
    }

    #[test]
    fn reconnect_ms_is_rendered_on_chardev() {
        let mut cfg = lab();
        cfg.vhost_user[0].reconnect_ms = Some(250);
        let args = cfg.qemu_args().unwrap();
        assert_eq!(
            value_of(&args, "-chardev"),
            "socket,id=vu0,path=/lab/vu.sock,reconnect-ms=250"
        );
    }

    #[test]
    fn virtio_ids_qemu_cannot_name_are_refused() {
        let mut cfg = VmConfig::from_toml_str(crate::LAB_CONFIG_TOML).unwrap();
        cfg.vhost_user[0].virtio_id = 52;
        assert!(cfg.cloud_hypervisor_args().is_err() || cfg.validate().is_ok());
        let err = cfg.qemu_args().unwrap_err().to_string();
        assert!(
            err.contains("virtio_id 52") && err.contains("QEMU"),
            "{err}"
        );
        cfg.vhost_user[0].virtio_id = 41;
        assert!(cfg.qemu_args().is_ok());
    }

    #[test]
    fn config_size_is_rendered_only_when_nonzero() {
        let mut cfg = lab();
        cfg.vhost_user[0].config_size = 24;
        let args = cfg.qemu_args().unwrap();
        assert_eq!(
            value_of(&args, "-device"),
            "vhost-user-test-device-pci,chardev=vu0,virtio-id=21,num_vqs=2,vq_size=256,config_size=24"
        );
        cfg.vhost_user[0].config_size = 0;
        let args = cfg.qemu_args().unwrap();
        assert!(!value_of(&args, "-device").contains("config_size"));
    }

    #[test]
    fn multiple_devices_render_in_order() {
        let cfg = lab().with_device(VhostUserDevice::new("vu1", "/lab/vu1.sock", 1, [64]));
        let args = cfg.qemu_args().unwrap();
        assert_eq!(
            &args[args.len() - 8..],
            argv(&[
                "-chardev",
                "socket,id=vu0,path=/lab/vu.sock",
                "-device",
                "vhost-user-test-device-pci,chardev=vu0,virtio-id=21,num_vqs=2,vq_size=256,config_size=48",
                "-chardev",
                "socket,id=vu1,path=/lab/vu1.sock",
                "-device",
                "vhost-user-test-device-pci,chardev=vu1,virtio-id=1,num_vqs=1,vq_size=64",
            ])
            .as_slice()
        );
    }

    #[test]
    fn mixed_queue_sizes_are_a_qemu_error() {
        let mut cfg = lab();
        cfg.vhost_user[0].queue_sizes = vec![256, 128];
        cfg.validate().unwrap();
        let err = cfg.qemu_args().unwrap_err();
        assert!(
            matches!(err, ConfigError::QemuMixedQueueSizes { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        for needle in [
            "vhost_user[0] (vu0)",
            "queue_sizes [256, 128]",
            "single vq_size",
        ] {
            assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
        }
    }

    #[test]
    fn queue_size_above_1024_is_a_qemu_error() {
        let mut cfg = lab();
        cfg.vhost_user[0].queue_sizes = vec![1024, 1024];
        cfg.qemu_args().unwrap();
        cfg.vhost_user[0].queue_sizes = vec![2048, 2048];
        cfg.validate().unwrap();
        let err = cfg.qemu_args().unwrap_err();
        assert!(
            matches!(err, ConfigError::QemuQueueSizeTooLarge { size: 2048, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        for needle in ["vhost_user[0] (vu0)", "2048", "VIRTQUEUE_MAX_SIZE", "1024"] {
            assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
        }
    }

    #[test]
    fn virtio_serial_ports_follow_the_devices_on_one_controller() {
        use crate::VirtioSerialPort;
        let cfg = lab()
            .with_serial_port(VirtioSerialPort::new(
                "vs0",
                "/lab/run/bench.sock",
                "vdevlab.bench",
            ))
            .with_serial_port(VirtioSerialPort::new("vs1", "/run/a,b.sock", "second"));
        let args = cfg.qemu_args().unwrap();
        assert_eq!(
            &args[args.len() - 14..],
            argv(&[
                "-chardev",
                "socket,id=vu0,path=/lab/vu.sock",
                "-device",
                "vhost-user-test-device-pci,chardev=vu0,virtio-id=21,num_vqs=2,vq_size=256,config_size=48",
                "-device",
                "virtio-serial-pci,id=vserial0",
                "-chardev",
                "socket,id=vs0,path=/lab/run/bench.sock,server=on,wait=off",
                "-device",
                "virtserialport,bus=vserial0.0,chardev=vs0,name=vdevlab.bench",
                "-chardev",
                "socket,id=vs1,path=/run/a,,b.sock,server=on,wait=off",
                "-device",
                "virtserialport,bus=vserial0.0,chardev=vs1,name=second",
            ])
            .as_slice()
        );
        // Without ports, no controller.
        assert!(!lab()
            .qemu_args()
            .unwrap()
            .iter()
            .any(|a| a.contains("virtio-serial")));
    }
}
