//! Config-change interrupts over real vhost-user: the test device
//! (`vdevlab-cfgdev`) changes its config space and the core sends
//! `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the backend channel, which the
//! kit's frontend serves ([`kit::BackendChannel`]). Each test says what it
//! checks; every wait is bounded.

use std::time::{Duration, Instant};

use serde_json::json;
use vdevlab_device_testkit::{self as kit, Ack, Config, Device, Layout, Options, Vmm};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;

const LAYOUT: Layout = Layout {
    queues: 1,
    queue_size: 256,
    mem_size: 1 << 20,
    data_base: 0x10000,
};
const CONFIG: Config = Config {
    layout: LAYOUT,
    features: 0,
};
const TIMEOUT: Duration = Duration::from_secs(10);

fn device() -> Device {
    Device::spawn(env!("CARGO_BIN_EXE_vdevlab-cfgdev"), &[])
}

fn connect(dev: &Device, options: Options) -> Vmm {
    dev.vmm_with(CONFIG, options)
}

fn channel(vmm: &Vmm) -> &kit::BackendChannel {
    vmm.backend.as_ref().expect("the backend channel is set up")
}

/// The value word of the config space, read as a VMM reads it.
fn read_value(vmm: &mut Vmm) -> u32 {
    let (_, payload) = vmm
        .fe
        .get_config(0, 12, VhostUserConfigFlags::empty(), &[0u8; 12])
        .expect("GET_CONFIG");
    u32::from_le_bytes([payload[4], payload[5], payload[6], payload[7]])
}

/// Wait until `name` reaches `n` (the sender is asynchronous).
fn wait_counter(ctl: &mut kit::Ctl, name: &str, n: u64) -> u64 {
    let mut got = 0;
    kit::wait_until(TIMEOUT, || {
        got = ctl.counter(name);
        got >= n
    });
    got
}

#[test]
fn device_change_is_raised_sent_and_acked() {
    let dev = device();
    let mut vmm = connect(&dev, Options::default());
    let mut ctl = dev.ctl();
    ctl.ok(json!({"op":"set_value","value":7}));
    assert_eq!(channel(&vmm).wait_config_changes(1, TIMEOUT), 1);
    assert_eq!(wait_counter(&mut ctl, "config_changes_acked", 1), 1);
    let s = ctl.stats();
    assert_eq!(s["config_changes_raised"], 1);
    assert_eq!(s["config_changes_sent"], 1);
    assert_eq!(s["config_changes_failed"], 0);
    assert_eq!(
        read_value(&mut vmm),
        7,
        "the driver's re-read sees the change"
    );
    // The control plane's own request, waiting for the outcome.
    let r = ctl.ok(json!({"op":"config_change"}));
    assert_eq!(r["delivery"], "acked", "{r:?}");
    assert_eq!(channel(&vmm).config_changes(), 2);
}

#[test]
fn without_reply_ack_the_change_is_sent_unacknowledged() {
    let dev = device();
    let vmm = connect(
        &dev,
        Options {
            reply_ack: false,
            ..Options::default()
        },
    );
    let mut ctl = dev.ctl();
    let r = ctl.ok(json!({"op":"config_change"}));
    assert_eq!(r["delivery"], "sent", "{r:?}");
    assert_eq!(channel(&vmm).wait_config_changes(1, TIMEOUT), 1);
    assert_eq!(ctl.counter("config_changes_acked"), 0);
    assert_eq!(ctl.counter("config_changes_failed"), 0);
}

#[test]
fn no_vmm_and_no_backend_channel_are_refused_and_counted() {
    let dev = device();
    let mut ctl = dev.ctl();
    let e = ctl.err(json!({"op":"config_change"}));
    assert!(e.contains("no VMM"), "{e}");
    let _vmm = connect(
        &dev,
        Options {
            backend_req: false,
            ..Options::default()
        },
    );
    let e = ctl.err(json!({"op":"config_change"}));
    assert!(e.contains("BACKEND_REQ"), "{e}");
    // The device's own call gets the same refusal.
    let e = ctl.err(json!({"op":"set_value","value":1}));
    assert!(e.contains("BACKEND_REQ"), "{e}");
    let s = ctl.stats();
    assert_eq!(s["config_changes_raised"], 3);
    assert_eq!(s["config_changes_failed"], 3);
    assert_eq!(s["config_changes_sent"], 0);
}

#[test]
fn config_not_negotiated_is_refused() {
    let dev = device();
    let _vmm = connect(
        &dev,
        Options {
            config: false,
            ..Options::default()
        },
    );
    let e = dev.ctl().err(json!({"op":"config_change"}));
    assert!(e.contains("CONFIG protocol feature"), "{e}");
}

#[test]
fn refused_ack_counts_as_failed() {
    let dev = device();
    let vmm = connect(
        &dev,
        Options {
            ack: Ack::Refuse,
            ..Options::default()
        },
    );
    let mut ctl = dev.ctl();
    let r = ctl.ok(json!({"op":"config_change"}));
    assert_eq!(r["delivery"], "refused", "{r:?}");
    assert_eq!(channel(&vmm).config_changes(), 1);
    let s = ctl.stats();
    assert_eq!(s["config_changes_sent"], 1);
    assert_eq!(s["config_changes_acked"], 0);
    assert_eq!(s["config_changes_failed"], 1);
    // The connection and the channel stay usable.
    channel(&vmm).set_ack(Ack::Ok);
    let r = ctl.ok(json!({"op":"config_change"}));
    assert_eq!(r["delivery"], "acked", "{r:?}");
}

#[test]
fn never_acked_change_times_out_within_the_bound() {
    let dev = device();
    let mut vmm = connect(
        &dev,
        Options {
            ack: Ack::Never,
            ..Options::default()
        },
    );
    let mut ctl = dev.ctl();
    let t0 = Instant::now();
    let r = ctl.ok(json!({"op":"config_change"}));
    let took = t0.elapsed();
    assert_eq!(r["delivery"], "timeout", "{r:?}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(3),
        "the sender waits about 2 s for the answer, took {took:?}"
    );
    assert_eq!(ctl.counter("config_changes_failed"), 1);
    // The main socket was served all along.
    assert_eq!(read_value(&mut vmm), 0);
}

#[test]
fn driver_write_notifies_without_deadlock_while_the_vmm_is_busy() {
    // QEMU handles the backend channel on the thread that also waits for
    // the backend's answers on the main socket (under its big lock). Play
    // that: hold the channel's lock across a SET_CONFIG whose handler (the
    // device's write_config, on the vhost-user thread) raises a config
    // change. Sent from that thread with NEED_REPLY, the change would wait
    // for an answer the VMM cannot give before SET_CONFIG returns.
    let dev = device();
    let mut vmm = connect(&dev, Options::default());
    let busy = channel(&vmm).busy_lock();
    let t0 = Instant::now();
    {
        let _held = busy.lock().unwrap();
        vmm.fe
            .set_config(4, VhostUserConfigFlags::WRITABLE, &9u32.to_le_bytes())
            .expect("SET_CONFIG answered while the backend channel is busy");
        // More main-socket traffic while the change waits for its answer.
        for _ in 0..20 {
            assert_eq!(read_value(&mut vmm), 9);
        }
    }
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "the main socket never waited for the backend channel ({:?})",
        t0.elapsed()
    );
    assert_eq!(channel(&vmm).wait_config_changes(1, TIMEOUT), 1);
    let mut ctl = dev.ctl();
    assert_eq!(wait_counter(&mut ctl, "config_changes_acked", 1), 1);
}

#[test]
fn storm_sends_count_changes_at_the_rate() {
    let dev = device();
    let vmm = connect(&dev, Options::default());
    let mut ctl = dev.ctl();
    let (count, rate_hz) = (20u32, 100u32);
    ctl.ok(json!({"op":"fault","fault":{
        "kind":"config_change_storm","count":count,"rate_hz":rate_hz,"jitter_pct":20,"seed":3}}));
    let ch = channel(&vmm);
    assert_eq!(
        ch.wait_config_changes(count as usize, TIMEOUT),
        count as usize
    );
    assert_eq!(
        wait_counter(&mut ctl, "config_changes_acked", u64::from(count)),
        u64::from(count)
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(ch.config_changes(), count as usize, "exactly count changes");
    let times = ch.config_change_times();
    let span = times[times.len() - 1] - times[0];
    // 19 intervals of 10 ms, each at least 8 ms with 20 % jitter.
    assert!(
        span >= Duration::from_millis(19 * 8),
        "the storm keeps its rate: {span:?} for {count} changes"
    );
    assert_eq!(ctl.counter("config_changes_raised"), u64::from(count));
}

#[test]
fn storm_is_stopped_by_clear_and_checks_its_parameters() {
    let dev = device();
    let vmm = connect(&dev, Options::default());
    let mut ctl = dev.ctl();
    let e =
        ctl.err(json!({"op":"fault","fault":{"kind":"config_change_storm","count":5,"rate_hz":0}}));
    assert!(e.contains("rate_hz"), "{e}");
    ctl.ok(json!({"op":"fault","fault":{"kind":"config_change_storm","count":1000,"rate_hz":50}}));
    assert!(channel(&vmm).wait_config_changes(2, TIMEOUT) >= 2);
    ctl.ok(json!({"op":"fault","fault":{"kind":"clear"}}));
    std::thread::sleep(Duration::from_millis(100));
    let n = channel(&vmm).config_changes();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(channel(&vmm).config_changes(), n, "no change after clear");
    assert!(n < 1000);
}

#[test]
fn hostile_change_leaves_the_config_unchanged() {
    let dev = device();
    let mut vmm = connect(&dev, Options::default());
    let mut ctl = dev.ctl();
    let before = ctl.ok(json!({"op":"config"}))["data"].clone();
    ctl.ok(json!({"op":"fault","fault":{"kind":"hostile_config_change","count":3}}));
    assert_eq!(channel(&vmm).wait_config_changes(3, TIMEOUT), 3);
    assert_eq!(wait_counter(&mut ctl, "hostile_config_changes", 3), 3);
    assert_eq!(ctl.ok(json!({"op":"config"}))["data"], before);
    assert_eq!(read_value(&mut vmm), 0);
}

#[test]
fn hostile_flicker_flips_the_bytes_and_ends_on_the_real_config() {
    let dev = device();
    let mut vmm = connect(&dev, Options::default());
    let mut ctl = dev.ctl();
    ctl.ok(json!({"op":"set_value","value":0x1234}));
    // Slow flips, so a read between two of them sees one state or the other.
    ctl.ok(json!({"op":"fault","fault":{
        "kind":"hostile_config_flicker","count":4,"period_us":100000,"offset":4,"len":4}}));
    let mut seen = std::collections::BTreeSet::new();
    kit::wait_until(TIMEOUT, || {
        seen.insert(read_value(&mut vmm));
        seen.len() >= 2
    });
    assert!(
        seen.contains(&0x1234) && seen.contains(&!0x1234u32),
        "{seen:x?}"
    );
    assert_eq!(wait_counter(&mut ctl, "hostile_config_flips", 4), 4);
    // 1 for set_value, 4 flips.
    assert_eq!(channel(&vmm).wait_config_changes(5, TIMEOUT), 5);
    assert_eq!(read_value(&mut vmm), 0x1234, "it ends on the real config");
}

#[test]
fn reconnect_sets_up_a_new_channel() {
    let dev = device();
    let old = dev.socket_id();
    let vmm = connect(&dev, Options::default());
    drop(vmm);
    assert!(dev.wait_relisten(old, TIMEOUT), "the backend listens again");
    let vmm = connect(&dev, Options::default());
    let r = dev.ctl().ok(json!({"op":"config_change"}));
    assert_eq!(r["delivery"], "acked", "{r:?}");
    assert_eq!(channel(&vmm).config_changes(), 1);
}

/// What each real VMM does with config changes, replayed
/// ([`kit::vmm::Replay`]): Cloud Hypervisor hands over the backend channel
/// only when the driver activates the device, QEMU at start; both ask for
/// (and give) an acknowledgement.
#[test]
fn config_changes_follow_each_vmm_replay() {
    use kit::vmm::{Replay, Script, Target};
    let target = Target {
        layout: LAYOUT,
        config_size: 12,
    };
    for script in Script::ALL {
        let name = script.name();
        let dev = device();
        let mut ctl = dev.ctl();
        let mut r = Replay::start(script, &dev, target);
        let before = r.guest_read_config(0, 12).expect("config");
        assert_eq!(&before[0..4], b"DGFC", "{name}");
        if script == Script::CloudHypervisor {
            let e = ctl.err(json!({"op":"config_change"}));
            assert!(e.contains("SET_BACKEND_REQ_FD"), "{name}: {e}");
        }
        r.activate(0);
        let t = ctl.ok(json!({"op":"set_value","value":5}));
        assert_eq!(t["value"], 5);
        assert_eq!(r.answer_config_change(0), Ok(true), "{name}: NEED_REPLY");
        assert_eq!(
            wait_counter(&mut ctl, "config_changes_acked", 1),
            1,
            "{name}"
        );
        // The guest's next read is a fresh GET_CONFIG: it sees the change.
        let after = r.guest_read_config(0, 12).expect("config");
        assert_eq!(
            u32::from_le_bytes(after[4..8].try_into().unwrap()),
            5,
            "{name}"
        );
        // A refusal is counted as a failure; the connection stays.
        let failed = ctl.counter("config_changes_failed");
        ctl.ok(json!({"op":"config_change","wait":false}));
        assert_eq!(r.answer_config_change(u64::MAX), Ok(true));
        assert_eq!(
            wait_counter(&mut ctl, "config_changes_failed", failed + 1),
            failed + 1,
            "{name}"
        );
        assert!(r
            .sent()
            .iter()
            .any(|m| m == "<- CONFIG_CHANGE_MSG +NEED_REPLY"));
        let _ = r
            .guest_read_config(0, 12)
            .expect("the connection serves on");
    }
}
