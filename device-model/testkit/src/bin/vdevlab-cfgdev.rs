//! `vdevlab-cfgdev`: the smallest device with a config space that changes,
//! for the kit's own protocol tests of config-change interrupts
//! (`device-model/testkit/tests/config_change.rs`). One queue that is never
//! used; a config space of three words: a magic, a value, and how many
//! times the value changed. The value changes from the control plane
//! (`{"op":"set_value","value":N}`) or from a driver write at offset 4; the
//! device then raises a config-change interrupt, as a real device would.

use clap::Parser;
use serde_json::Value;
use vdevlab_device_core::config::{get_u32, le_words, written_u32};
use vdevlab_device_core::daemon::{init_logging, run, DaemonArgs};
use vdevlab_device_core::{Chain, Core, Direction, Fields, Outcome, QueueSpec, VirtioDevice};

/// The config space's first word.
const MAGIC: u32 = 0x4346_4744; // "DGFC"
/// Offset of the value.
const VALUE: u32 = 4;

#[derive(Debug, Parser)]
#[command(about = "A test device whose config space changes at run time")]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Debug, Default)]
struct CfgDev {
    value: u32,
    changes: u32,
    notify_errors: u64,
}

impl CfgDev {
    fn change(&mut self, value: u32, core: &Core) -> Result<(), String> {
        self.value = value;
        self.changes = self.changes.wrapping_add(1);
        core.notify_config_change().map_err(|e| {
            self.notify_errors += 1;
            e.to_string()
        })
    }
}

impl VirtioDevice for CfgDev {
    fn name(&self) -> &'static str {
        "cfgdev"
    }

    fn queues(&self) -> Vec<QueueSpec> {
        vec![QueueSpec::new("q", 256, Direction::DeviceWrites)]
    }

    fn config_space(&self, _core: &Core) -> Vec<u8> {
        le_words(&[MAGIC, self.value, self.changes])
    }

    fn write_config(&mut self, offset: u32, data: &[u8], core: &mut Core) -> Result<(), String> {
        let value = written_u32(offset, data, VALUE)
            .ok_or_else(|| format!("only the value (offset {VALUE}, 4 bytes) is writable"))?;
        // On the vhost-user thread, inside the VMM's SET_CONFIG: the
        // notification must only be queued here.
        if let Err(e) = self.change(value, core) {
            tracing::warn!(error = %e, "config change not raised");
        }
        Ok(())
    }

    fn wants_buffers(&self, _queue: u16) -> bool {
        false
    }

    fn handle_chain(&mut self, _queue: u16, _chain: &Chain<'_>, _core: &mut Core) -> Outcome {
        Outcome::Defer
    }

    fn reset(&mut self, _core: &mut Core) {}

    fn control(
        &mut self,
        op: &str,
        request: &Value,
        core: &mut Core,
    ) -> Option<Result<Fields, String>> {
        if op != "set_value" {
            return None;
        }
        let Some(value) = request.get("value").and_then(Value::as_u64) else {
            return Some(Err("set_value needs \"value\" (a u32)".into()));
        };
        Some(self.change(value as u32, core).map(|()| {
            let mut f = Fields::new();
            let cfg = self.config_space(core);
            f.insert("value".into(), get_u32(&cfg, VALUE as usize).into());
            f
        }))
    }

    fn counters(&self) -> Fields {
        let mut f = Fields::new();
        f.insert("notify_errors".into(), self.notify_errors.into());
        f
    }
}

fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    run(&args.daemon, CfgDev::default())
}
