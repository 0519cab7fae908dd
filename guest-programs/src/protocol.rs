//! The guest/host protocol: the lines the guest prints on its serial
//! console, which the harness (`vdevlab_lab::guest::Guest`) waits for.
//! The guest programs print them through this module, the harness matches
//! them through it, and the guest's init (`images/init.sh`) and a user
//! project's scenario runner print the same words (a lab test holds
//! `init.sh` to these names).
//!
//! Every marker starts a line and is followed by a space and its payload:
//!
//! | marker | printed by | payload |
//! | --- | --- | --- |
//! | [`BOOT`] | init, first thing | `uptime=<s> kernel=<release>` |
//! | [`DRIVER_READY`] | init, once the device node exists | `uptime=<s>` |
//! | [`VPORT`] | init, per virtio-serial port | `<port> <link>` |
//! | [`READY`] | a program, about to wait on the device | `<scenario>` |
//! | [`TEARDOWN`] | the teardown programs, at each step | `<step>` |
//! | [`RESULT`] | a program, at its end | `{"scenario":"<name>","ok":...}` |
//! | [`FAIL`] | init, when it cannot go on | why |
//! | [`EXIT`] | init, after the last program | its exit status |
//! | [`DMESG_BEGIN`], [`DMESG_END`] | init, around the kernel log at the end | - |
//! | [`SHELL`], [`SHELL_END`] | init, around an interactive shell | - |

/// What every marker starts with.
pub const PREFIX: &str = "VDEVLAB-";
/// init reached: the kernel has booted.
pub const BOOT: &str = "VDEVLAB-BOOT";
/// The driver is bound (its device node exists).
pub const DRIVER_READY: &str = "VDEVLAB-DRIVER-READY";
/// A virtio-serial port and its `/dev/virtio-ports` link.
pub const VPORT: &str = "VDEVLAB-VPORT";
/// A program has opened the device and is about to wait on it: the host
/// may start injecting (or draining the capture).
pub const READY: &str = "VDEVLAB-READY";
/// A teardown program's step.
pub const TEARDOWN: &str = "VDEVLAB-TEARDOWN";
/// A program's result, one JSON object.
pub const RESULT: &str = "VDEVLAB-RESULT";
/// init failed before the programs could run.
pub const FAIL: &str = "VDEVLAB-FAIL";
/// init's exit status after the last program.
pub const EXIT: &str = "VDEVLAB-EXIT";
/// init's copy of the kernel log starts (after [`EXIT`]).
pub const DMESG_BEGIN: &str = "VDEVLAB-DMESG-BEGIN";
/// init's copy of the kernel log ended.
pub const DMESG_END: &str = "VDEVLAB-DMESG-END";
/// An interactive shell starts (`vdevlab up`).
pub const SHELL: &str = "VDEVLAB-SHELL";
/// The interactive shell ended.
pub const SHELL_END: &str = "VDEVLAB-SHELL-END";

/// `VDEVLAB-READY <scenario>`.
pub fn ready_line(scenario: &str) -> String {
    format!("{READY} {scenario}")
}

/// Whether `line` (from its marker on) is `scenario`'s READY line: the
/// name itself, not a longer one (`name-2`, `name_x`), maybe followed by a
/// kernel message that landed on the same console line, right after the
/// name and without a space (seen: `VDEVLAB-READY needs-reset-2tsc:
/// Refined TSC clocksource calibration`): so only a separator that names
/// use makes it another name.
pub fn is_ready(line: &str, scenario: &str) -> bool {
    line.strip_prefix(&ready_line(scenario))
        .is_some_and(|rest| !rest.starts_with(['-', '_', '.']))
}

/// The start of `scenario`'s result line, up to its name (what the harness
/// waits for: `VDEVLAB-RESULT {"scenario":"<name>"`).
pub fn result_prefix(scenario: &str) -> String {
    format!("{RESULT} {{\"scenario\":\"{scenario}\"")
}

/// The JSON of a result line (`line` from its marker on), if it is one.
pub fn result_json(line: &str) -> Option<&str> {
    line.strip_prefix(RESULT).map(str::trim)
}

/// The reason of a [`FAIL`] line (`line` from its marker on).
pub fn fail_reason(line: &str) -> Option<&str> {
    line.strip_prefix(FAIL)
        .and_then(|rest| rest.strip_prefix(' '))
}

/// The exit status of an [`EXIT`] line, wherever the marker sits in it.
pub fn exit_status(line: &str) -> Option<i32> {
    line.split_once(&format!("{EXIT} "))
        .and_then(|(_, code)| code.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        assert_eq!(ready_line("poll-rx"), "VDEVLAB-READY poll-rx");
        let line = "VDEVLAB-RESULT {\"scenario\":\"poll-rx\",\"ok\":true}";
        assert!(line.starts_with(&result_prefix("poll-rx")));
        // The name ends at its quote: "poll" is not "poll-rx".
        assert!(!line.starts_with(&result_prefix("poll")));
        assert_eq!(
            result_json(line),
            Some("{\"scenario\":\"poll-rx\",\"ok\":true}")
        );
        assert_eq!(result_json("VDEVLAB-READY x"), None);
        assert_eq!(fail_reason("VDEVLAB-FAIL no /dev/qw0"), Some("no /dev/qw0"));
        assert_eq!(fail_reason("VDEVLAB-FAILED"), None);
        assert_eq!(exit_status("[ 3.2] VDEVLAB-EXIT 1"), Some(1));
        assert_eq!(exit_status("VDEVLAB-EXIT x"), None);
        assert!(is_ready("VDEVLAB-READY reset", "reset"));
        assert!(is_ready("VDEVLAB-READY reset\r", "reset"));
        assert!(is_ready("VDEVLAB-READY reset[ 26.9] qw0: bound", "reset"));
        assert!(!is_ready("VDEVLAB-READY reset-2", "reset"));
        assert!(!is_ready("VDEVLAB-READY reset_b", "reset"));
        let glued = "VDEVLAB-READY needs-reset-2tsc: Refined TSC clocksource calibration";
        assert!(is_ready(glued, "needs-reset-2"));
        assert!(!is_ready(glued, "needs-reset"));
        for m in [
            BOOT,
            DRIVER_READY,
            VPORT,
            READY,
            TEARDOWN,
            RESULT,
            FAIL,
            EXIT,
            SHELL,
        ] {
            assert!(m.starts_with(PREFIX), "{m}");
        }
    }
}
