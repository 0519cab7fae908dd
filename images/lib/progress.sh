# shellcheck shell=bash
# Progress output for the provisioning scripts (images/*.sh source this).
#
# One line per step: what it does and how long it took, or "cached". The
# output of the commands a step runs (apt, mmdebstrap, make, ...) goes to a
# log file, by default $VDEVLAB_CACHE/provision.log (VDEVLAB_LOG picks
# another). On a terminal the step's line carries a live elapsed-seconds
# counter; elsewhere (CI, a test's captured stderr) nothing is printed until
# the step ends. When a command fails, die prints the log's path and its
# last lines.
#
#   VDEVLAB_VERBOSE=1   stream every command's output to stderr as well (and
#                       still to the log); `vdevlab --verbose` sets it
#
# The sourcing script sets PROGRESS_TAG (the "[vdevlab TAG]" prefix) and
# CACHE first, and uses:
#
#   say MESSAGE            a line of its own (a note the user should see)
#   note MESSAGE           a line for the log only (stderr too when verbose)
#   step_begin LABEL       start a step ("(3/8) QEMU in the root")
#   run_logged WHAT CMD... run CMD (a command or a shell function) with its
#                          stdout and stderr appended to the log; WHAT is
#                          shown next to the counter. Returns CMD's status:
#                          write `run_logged ... || die "..."`
#   step_end [WORD]        end the step: "done in N s" when it ran anything,
#                          else WORD (default "cached")
#   step_end_as [WORD] end it with WORD even though it ran a command
#   PROGRESS_DETAIL=CMD run_logged ...   CMD's output is shown next to the
#                          counter, refreshed every second
#   PROGRESS_TAIL_LOG=FILE run_logged ...   the command writes its own log
#                          (make > build.log): die shows FILE's tail
#   die MESSAGE            the error line (after the log's tail if the last
#                          command failed), exit 1
#
# A script run by another one's run_logged (lab-kernel.sh under
# provision.sh) sees VDEVLAB_PROGRESS_NESTED=1: its stderr already goes to
# the log, so it streams everything there and prints no counter or tail.

: "${PROGRESS_TAG:?the sourcing script sets PROGRESS_TAG}" "${CACHE:?the sourcing script sets CACHE}"
PROGRESS_LOG=${VDEVLAB_LOG:-$CACHE/provision.log}
export VDEVLAB_LOG=$PROGRESS_LOG
PROGRESS_TAIL=${VDEVLAB_LOG_TAIL:-30}
if [ "${VDEVLAB_PROGRESS_NESTED:-}" = 1 ]; then
    PROGRESS_MODE=nested
elif [ -n "${VDEVLAB_VERBOSE:-}" ] && [ "${VDEVLAB_VERBOSE}" != 0 ]; then
    PROGRESS_MODE=verbose
elif [ -t 2 ] && [ "${TERM:-dumb}" != dumb ]; then
    PROGRESS_MODE='tty'
else
    PROGRESS_MODE=quiet
fi
_progress_label=""    # the open step's label, empty when none is open
_progress_t0=0        # when it began
_progress_ran=""      # it ran a command
_progress_live=""     # a live line (no newline yet) is on the terminal
_progress_failed=""   # the last run_logged failed: the log to show
_progress_header=""   # this run's header is in the log

say() {
    _progress_clear
    printf '[vdevlab %s] %s\n' "$PROGRESS_TAG" "$*" >&2
    _progress_redraw
}

note() {
    _progress_log_header
    printf '[vdevlab %s] %s\n' "$PROGRESS_TAG" "$*" >> "$PROGRESS_LOG"
    case $PROGRESS_MODE in verbose | nested) printf '[vdevlab %s] %s\n' "$PROGRESS_TAG" "$*" >&2 ;; esac
}

die() {
    local secs=$(( $(date +%s) - _progress_t0 ))
    if [ -n "$_progress_label" ]; then
        _progress_clear
        case $PROGRESS_MODE in
            tty | quiet) printf '[vdevlab %s] %s ... failed after %s s\n' "$PROGRESS_TAG" "$_progress_label" "$secs" >&2 ;;
        esac
        _progress_label=""
    fi
    if [ -n "$_progress_failed" ]; then
        # The log's tail, unless it has been streamed already.
        if [ "$PROGRESS_MODE" = tty ] || [ "$PROGRESS_MODE" = quiet ] || [ "$_progress_failed" != "$PROGRESS_LOG" ]; then
            printf '[vdevlab %s] the log is %s; its last %s lines:\n' "$PROGRESS_TAG" "$_progress_failed" "$PROGRESS_TAIL" >&2
            tail -n "$PROGRESS_TAIL" "$_progress_failed" | sed 's/^/    /' >&2
        elif [ "$PROGRESS_MODE" = verbose ]; then
            printf '[vdevlab %s] the log is %s\n' "$PROGRESS_TAG" "$PROGRESS_LOG" >&2
        fi
    fi
    printf '[vdevlab %s] error: %s\n' "$PROGRESS_TAG" "$*" >&2
    exit 1
}

step_begin() {
    [ -z "$_progress_label" ] || step_end
    _progress_label=$1
    _progress_t0=$(date +%s)
    _progress_ran=""
    _progress_failed=""
    case $PROGRESS_MODE in
        verbose | nested) printf '[vdevlab %s] %s\n' "$PROGRESS_TAG" "$1" >&2 ;;
        tty) _progress_draw "" 0 ;;
    esac
}

step_end() {
    [ -n "$_progress_label" ] || return 0
    local secs=$(( $(date +%s) - _progress_t0 )) result=${1:-cached}
    [ -z "$_progress_ran" ] || result="done in $secs s"
    _progress_clear
    printf '[vdevlab %s] %s ... %s\n' "$PROGRESS_TAG" "$_progress_label" "$result" >&2
    _progress_label=""
}

# End a step whose command turned out to have nothing to do.
step_end_as() {
    _progress_ran=""
    step_end "$@"
}

run_logged() {
    local what=$1 rc=0 pid tick=""
    shift
    _progress_log_header
    printf -- '--- %s: %s (%s)\n' "$(date -u '+%H:%M:%S')" "$what" "$*" >> "$PROGRESS_LOG"
    _progress_ran=1
    # The command runs in the background so that a signal to this script
    # (a test harness's SIGTERM, ^C) is handled now, not when it finishes,
    # and stops it too. Background jobs ignore SIGINT: TERM it.
    case $PROGRESS_MODE in
        tty | quiet) _progress_exec "$@" >> "$PROGRESS_LOG" 2>&1 < /dev/null & ;;
        verbose)
            printf '[vdevlab %s] %s\n' "$PROGRESS_TAG" "$what" >&2
            ( _progress_exec "$@" 2>&1 < /dev/null | tee -a "$PROGRESS_LOG" >&2; exit "${PIPESTATUS[0]}" ) &
            ;;
        nested)
            printf '[vdevlab %s] %s\n' "$PROGRESS_TAG" "$what" >&2
            _progress_exec "$@" >&2 < /dev/null &
            ;;
    esac
    pid=$!
    # shellcheck disable=SC2064
    trap "_progress_stop $pid; exit 143" TERM HUP
    # shellcheck disable=SC2064
    trap "_progress_stop $pid; exit 130" INT
    if [ "$PROGRESS_MODE" = tty ]; then
        _progress_tick "$what" &
        tick=$!
    fi
    wait "$pid" || rc=$?
    trap - TERM HUP INT
    if [ -n "$tick" ]; then
        kill -TERM "$tick" 2>/dev/null || true
        wait "$tick" 2>/dev/null || true
    fi
    if [ "$rc" -ne 0 ]; then
        printf -- '--- exit status %s\n' "$rc" >> "$PROGRESS_LOG"
        _progress_failed=${PROGRESS_TAIL_LOG:-$PROGRESS_LOG}
    else
        _progress_failed=""
    fi
    [ "$PROGRESS_MODE" != tty ] || _progress_draw "$what" $(( $(date +%s) - _progress_t0 ))
    return "$rc"
}

# The rest is internal.

# A command run by run_logged, in a subshell: scripts it runs know that
# their stderr is already taken care of. (Called as `run_logged ... || die`,
# errexit is off in there, as it is for any function called before ||: a
# shell function given to run_logged chains its commands with &&.)
_progress_exec() {
    export VDEVLAB_PROGRESS_NESTED=1
    # A program replaces the subshell, so that a signal reaches it.
    if [ "$(type -t "$1")" = file ]; then exec "$@"; fi
    "$@"
}

# Stop a command run_logged started: SIGTERM to it and everything below
# it (the processes a shell function started), found before any dies.
_progress_stop() { # pid
    local pids
    pids=$(_progress_tree "$1")
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null
    _progress_clear
}
_progress_tree() { # pid: it and its descendants, parents first
    local c
    echo "$1"
    for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do _progress_tree "$c"; done
}

_progress_log_header() {
    [ -z "$_progress_header" ] || return 0
    mkdir -p "$(dirname "$PROGRESS_LOG")"
    printf '\n=== %s: %s (pid %s)\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" "$PROGRESS_TAG" "$$" >> "$PROGRESS_LOG"
    _progress_header=1
}

_progress_cols() {
    local c
    c=$( (stty size <&2) 2>/dev/null | awk '{print $2}')
    case $c in '' | *[!0-9]* | 0) c=80 ;; esac
    echo "$c"
}

# The live line: "[vdevlab TAG] LABEL ... WHAT N s", the label shortened to
# fit the terminal so that \r rewrites it in place.
_progress_draw() { # what secs
    local head="[vdevlab $PROGRESS_TAG] " label=$_progress_label what=$1 count="" detail="" room keep
    [ -n "$label" ] || return 0
    [ "$2" -eq 0 ] || count=" $2 s"
    if [ -n "${PROGRESS_DETAIL:-}" ]; then
        detail=$(eval "$PROGRESS_DETAIL" 2>/dev/null || true)
        [ -z "$detail" ] || detail=", $detail"
    fi
    # Room for the label and WHAT; the counter always shows. The label
    # keeps at least 32 characters, WHAT gives way first.
    room=$(( ${_progress_width:=$(_progress_cols)} - 1 - ${#head} - 5 - ${#count} - ${#detail} ))
    keep=$(( ${#label} < 32 ? ${#label} : 32 ))
    if [ $(( ${#label} + ${#what} )) -gt "$room" ] && [ "${#what}" -gt $(( room - keep )) ]; then
        if [ $(( room - keep )) -gt 4 ]; then what="${what:0:room-keep-3}..."; else what=""; fi
    fi
    if [ $(( ${#label} + ${#what} )) -gt "$room" ]; then
        if [ $(( room - ${#what} )) -gt 4 ]; then label="${label:0:room-${#what}-3}..."; else label=""; fi
    fi
    printf '\r\033[K%s%s ...%s%s%s' "$head" "$label" "${what:+ $what}" "$count" "$detail" >&2
    _progress_live=1
}

_progress_clear() {
    [ -n "$_progress_live" ] || return 0
    printf '\r\033[K' >&2
    _progress_live=""
}

_progress_redraw() {
    [ "$PROGRESS_MODE" = tty ] && [ -n "$_progress_label" ] && _progress_draw "" $(( $(date +%s) - _progress_t0 ))
    return 0
}

_progress_tick() { # what: redraw every second until killed or the script is gone
    local parent=$$
    trap 'exit 0' TERM
    while kill -0 "$parent" 2>/dev/null; do
        sleep 1 &
        wait $!
        _progress_draw "$1" $(( $(date +%s) - _progress_t0 ))
    done
}
