#!/usr/bin/env bash
# The README's set-up as a new user meets it, on the committed HEAD:
#
#   git clone <this repo>; cd; npm install; npx node-nbd-server serve disk.img --size 1G
#
# in a temporary directory, with an empty temporary npm cache (so npm fetches
# every package from the registry and npx has no entry yet) and none of the
# npm_* variables of a calling npm. The two commands are read from README.md's
# "Set-up" block, so the check runs what the README says. Then:
#   - the first `npx` runs are interrupted at three points: at once (Ctrl-C:
#     SIGINT to the process group), when npm has resolved the bin and starts
#     it (SIGTERM to npm alone, as `timeout` does), and once the server
#     answers (Ctrl-C); each time the next run must still work;
#   - the README command, with `--socket` added (a free path instead of the
#     default TCP port 10809), serves disk.img: nbdinfo reads its size
#     (1 GiB); SIGTERM to the server ends the npx run with exit 0;
#   - no npx run rebuilt anything: the addon and the compiled CLI that
#     `npm install` made are the files that served (same mtimes).
# Nothing here measures time; each wait polls a state with a generous
# deadline that only bounds a hang. Prints "readme-setup: N passed, N failed"
# and exits non-zero when a check failed. Needs git, npm (registry access),
# nbdinfo and setsid. Takes about as long as one `npm install` (a minute or two).
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/nbd-readme-setup.XXXXXX")"
passed=0
failed=0
groups=()

ok() { passed=$((passed + 1)); echo "ok - $*"; }
not_ok() { failed=$((failed + 1)); echo "not ok - $*"; }
check() { # check "description" command...
  local what="$1"
  shift
  if "$@"; then ok "$what"; else not_ok "$what"; fi
}

cleanup() {
  # Every process group this script started (npm exec, its shell, the server).
  for g in "${groups[@]}"; do kill -KILL -- "-$g" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT

finish() {
  echo "readme-setup: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
  exit $?
}

# A new user's shell: no npm_* variables from a calling npm, an empty npm cache.
for v in $(env | sed -n 's/^\(npm_[A-Za-z0-9_]*\)=.*/\1/p'); do unset "$v"; done
unset INIT_CWD
export npm_config_cache="$work/npm-cache"

# CI may check the repository out as another user than the one running this
# (root): git then refuses the repository ("dubious ownership") unless
# safe.directory allows it, and only a protected (global or system) config
# may say so. A throw-away global config says it for this script's git
# commands only, leaving the machine's own config alone.
printf '[safe]\n\tdirectory = %s\n\tdirectory = %s/.git\n' "$root" "$root" >"$work/gitconfig"
export GIT_CONFIG_GLOBAL="$work/gitconfig"

if [ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]; then
  echo "# note: the work tree has uncommitted changes; this checks the committed HEAD"
fi
git clone -q "$root" "$work/repo" || { not_ok "git clone of HEAD"; finish; }
cd "$work/repo" || exit 1
echo "# checking $(git log --oneline -1) in $work/repo with npm $(npm --version), cache $npm_config_cache"

# The README's Set-up block (the first code block under "## Set-up"): its commands without their comments.
mapfile -t cmds < <(awk '/^## Set-up/ { s = 1; next } s && /^```/ { if (b) exit; b = 1; next } b' README.md | sed -e 's/[[:space:]]*#.*$//' -e '/^$/d')
check "README's Set-up is \`npm install\` then \`npx node-nbd-server serve disk.img --size 1G\` (found: ${cmds[*]:-nothing})" \
  test "${#cmds[@]}" -eq 2 -a "${cmds[0]:-}" = "npm install" -a "${cmds[1]:-}" = "npx node-nbd-server serve disk.img --size 1G"
[ "$failed" -eq 0 ] || finish
read -r -a install_cmd <<<"${cmds[0]}"
read -r -a serve_cmd <<<"${cmds[1]}"

echo "# ${cmds[0]} --no-audit --no-fund"
if "${install_cmd[@]}" --no-audit --no-fund >"$work/install.log" 2>&1; then
  ok "npm install"
else
  tail -40 "$work/install.log"
  not_ok "npm install"
  finish
fi
addon=build/Release/nbd_native.node
cli=dist/src/cli/main.js
stamp() { stat -c %Y.%y "$addon" "$cli" 2>/dev/null; }
built="$(stamp)"
check "npm install built the addon and the CLI" test -f "$addon" -a -f "$cli"

sock="$work/nbd.sock"
nbd_size() { nbdinfo --size "nbd+unix:///?socket=$sock" 2>/dev/null; }
nbd_ready() { nbd_size >/dev/null; }

# wait_for SECONDS COMMAND...: polls COMMAND every 0.1 s until it succeeds; fails after SECONDS (a hang bound).
wait_for() {
  local end=$((SECONDS + $1))
  shift
  until "$@"; do
    [ "$SECONDS" -lt "$end" ] || return 1
    sleep 0.1
  done
}
gone() { ! kill -0 "$1" 2>/dev/null; }
group_exists() { pgrep -g "$1" >/dev/null; }
group_gone() { ! group_exists "$1"; }
has_child() { pgrep -P "$1" >/dev/null; }

# start: runs the README command (+ --socket) in a process group of its own; sets $pid (npm, the group leader).
start() {
  rm -f "$sock"
  setsid "${serve_cmd[@]}" --socket "$sock" >"$work/serve.out" 2>"$work/serve.err" </dev/null &
  pid=$!
  groups+=("$pid")
  wait_for 30 group_exists "$pid" # setsid has made the group
}
# end_group: the group must end by itself (after SIGINT to all of it); anything left is killed and reported.
end_group() {
  if wait_for 60 group_gone "$pid"; then wait "$pid" 2>/dev/null; return 0; fi
  kill -KILL -- "-$pid" 2>/dev/null
  return 1
}
# The server's pid, from its first JSON log line on stderr.
server_pid() { sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "$work/serve.err" | head -1; }

# 1. Ctrl-C at once.
start
kill -INT -- "-$pid"
check "Ctrl-C right after \`${cmds[1]}\` started: every process of it ends" end_group

# 2. SIGTERM to npm alone once it starts the bin (its shell child exists); a server it
# started is orphaned (npm does not pass SIGTERM on) and is stopped here.
start
if wait_for 120 has_child "$pid"; then
  kill -TERM "$pid"
  wait_for 60 gone "$pid"
  wait "$pid" 2>/dev/null
  kill -TERM -- "-$pid" 2>/dev/null
  check "SIGTERM to npm once it started the bin: npm ends" gone "$pid"
  wait_for 60 group_gone "$pid" || kill -KILL -- "-$pid" 2>/dev/null
else
  not_ok "npx started the bin (no child of npm within 120 s); stderr: $(tail -5 "$work/serve.err")"
  kill -KILL -- "-$pid" 2>/dev/null
fi

# 3. Ctrl-C once the server answers.
start
if wait_for 120 nbd_ready; then
  kill -INT -- "-$pid"
  check "Ctrl-C once the server answered: every process of it ends" end_group
else
  not_ok "the server answered after the interrupted runs; stderr: $(tail -5 "$work/serve.err")"
  kill -KILL -- "-$pid" 2>/dev/null
fi

# 4. The README command, as the user runs it next.
rm -f disk.img
start
if wait_for 120 nbd_ready; then
  ok "\`${cmds[1]}\` serves after the interrupted runs"
  check "nbdinfo: the export is 1 GiB ($(nbd_size))" test "$(nbd_size)" = 1073741824
  check "disk.img was created with 1 GiB" test "$(stat -c %s disk.img 2>/dev/null)" = 1073741824
  spid="$(server_pid)"
  if [ -n "$spid" ] && kill -TERM "$spid" 2>/dev/null; then
    if wait_for 60 gone "$pid"; then
      wait "$pid"
      code=$?
      check "SIGTERM to the server: the npx run exits 0 (exit $code)" test "$code" -eq 0
      check "the server logged a clean stop" grep -q '"msg":"stopped"' "$work/serve.err"
    else
      not_ok "the npx run ended after SIGTERM to the server (pid $spid)"
    fi
  else
    not_ok "found the server's pid in its log ($(head -c 300 "$work/serve.err"))"
  fi
else
  not_ok "\`${cmds[1]}\` serves (nbdinfo on the socket); stdout: $(cat "$work/serve.out"); stderr: $(tail -5 "$work/serve.err")"
fi
kill -KILL -- "-$pid" 2>/dev/null

check "no npx run rebuilt the addon or the CLI (mtimes as npm install left them)" test "$(stamp)" = "$built"
finish
