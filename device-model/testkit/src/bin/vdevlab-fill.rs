//! `vdevlab-fill`: the smallest device that serves a queue, for the kit's
//! own protocol tests of the core's data path and device trace
//! (`device-model/testkit/tests/trace.rs`). One device-writable queue,
//! `q`: each buffer comes back full of one byte (`0xa5`), its whole
//! length used. No config space. Each completion is also recorded as the
//! device's own trace event `filled` (its length), to show
//! `Core::trace_event`.

use clap::Parser;
use vdevlab_device_core::daemon::{init_logging, run, DaemonArgs};
use vdevlab_device_core::{Chain, Core, Direction, Fields, Outcome, QueueSpec, VirtioDevice};

/// The byte every buffer is filled with.
const FILL: u8 = 0xa5;

#[derive(Debug, Parser)]
#[command(about = "A test device that fills every buffer it gets")]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Debug, Default)]
struct Fill {
    filled: u64,
}

impl VirtioDevice for Fill {
    fn name(&self) -> &'static str {
        "fill"
    }

    fn queues(&self) -> Vec<QueueSpec> {
        vec![QueueSpec::new("q", 256, Direction::DeviceWrites)]
    }

    fn config_space(&self, _core: &Core) -> Vec<u8> {
        Vec::new()
    }

    fn wants_buffers(&self, _queue: u16) -> bool {
        true
    }

    fn handle_chain(&mut self, _queue: u16, chain: &Chain<'_>, core: &mut Core) -> Outcome {
        let data = vec![FILL; chain.writable_len() as usize];
        match chain.write(&[&data]) {
            Ok(n) => {
                self.filled += n as u64;
                core.trace_event("filled", n as u64);
                Outcome::Complete { used_len: n as u32 }
            }
            Err(e) => Outcome::Refuse(e),
        }
    }

    fn reset(&mut self, _core: &mut Core) {}

    fn counters(&self) -> Fields {
        let mut f = Fields::new();
        f.insert("filled_bytes".into(), self.filled.into());
        f
    }
}

fn main() -> anyhow::Result<()> {
    init_logging();
    let args = Args::parse();
    run(&args.daemon, Fill::default())
}
