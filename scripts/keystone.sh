#!/usr/bin/env bash
# keystone.sh - a real OpenStack Keystone on 127.0.0.1 for Canopy's tests and CI.
#
# Keystone comes from Debian packages (python3-keystone, served by uwsgi); no
# systemd unit and no package-started daemon is involved. State (SQLite DB,
# fernet and credential keys, config, logs) lives in one directory, which can be
# copied: `prepare` builds a template once, tests `cp -a` it and `start` each copy
# on its own port.
#
# Run `scripts/keystone.sh --help` for the subcommands.
set -euo pipefail

PROG=${0##*/}
PY=/usr/bin/python3          # Debian's python: sees python3-keystone's modules
PACKAGES=(python3-keystone uwsgi-core uwsgi-plugin-python3 curl)
WSGI_APP=/usr/bin/keystone-wsgi-public
READY_TIMEOUT=${KEYSTONE_READY_TIMEOUT:-60}
TOKEN_EXPIRATION=${KEYSTONE_TOKEN_EXPIRATION:-3600}

log() { echo "[keystone] $*" >&2; }
die() { echo "[keystone] error: $*" >&2; exit 1; }

usage() {
  cat <<EOF
Usage: $PROG <command> [args]

A real OpenStack Keystone (Debian python3-keystone + uwsgi) on 127.0.0.1.

Commands:
  install             Install the Debian packages (needs root; idempotent).
                      Creates /usr/sbin/policy-rc.d (exit 101) if absent, so
                      package scripts start no daemons.
  prepare DIR         Build a template state directory once (DB, keys, admin,
                      service user 'canopy', tenants tenant-a/alice and
                      tenant-b/bob) and write DIR/ids.json. Does nothing if
                      DIR/ids.json exists. Safe to run concurrently.
  start DIR PORT      Serve DIR (a template or a 'cp -a' copy of one) on
                      127.0.0.1:PORT in the foreground (exec uwsgi; the caller
                      owns the process: SIGTERM or SIGKILL stops Keystone).
  start-bg DIR PORT   Same, but daemonized; returns once GET /v3 answers 200.
  stop DIR            Stop the Keystone serving DIR (pidfile) and wait.
  wait PORT [SECS]    Wait until http://127.0.0.1:PORT/v3 answers 200
                      (default ${READY_TIMEOUT}s).

Files in DIR: ids.json (names, ids, passwords), keystone.db, fernet-keys/,
credential-keys/, etc/keystone.conf, etc/uwsgi.ini, uwsgi.pid, port,
log/{uwsgi,keystone}.log, log/prepare-*.log, log/keystone-manage.log.

ids.json:
  {"domain_id": "default", "region": "RegionOne",
   "admin":   {"user","password","project","role","user_id","project_id"},
   "service": {"user","password","project","role","user_id","project_id"},
   "tenants": [{"project","project_id","user","user_id","password","role"}, ...]}
The service user (canopy, role 'service' on project 'service') may validate
other users' tokens: GET /v3/auth/tokens with X-Auth-Token (its own token) and
X-Subject-Token (the user's). Keystone's policy does not let it HEAD or DELETE
them: a token is revoked by its own user (X-Auth-Token = X-Subject-Token) or by
admin.

Environment: KEYSTONE_READY_TIMEOUT (seconds, default 60);
  KEYSTONE_TOKEN_EXPIRATION (token lifetime in seconds written by 'start',
  default 3600; tests of expiry use a few seconds).
Example:
  sudo $PROG install
  $PROG prepare /tmp/ks-template
  cp -a /tmp/ks-template /tmp/ks1 && $PROG start-bg /tmp/ks1 35357
  $PROG stop /tmp/ks1
EOF
}

abspath() { # existing or not-yet-existing path -> absolute path
  local d b
  d=$(dirname -- "$1"); b=$(basename -- "$1")
  mkdir -p -- "$d" || die "cannot create directory $d"
  d=$(cd -- "$d" && pwd -P)
  if [ "$b" = / ]; then echo /; elif [ "$d" = / ]; then echo "/$b"; else echo "$d/$b"; fi
}

check_port() {
  [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ] || die "invalid port '$1'"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

need_packages() {
  local p
  for p in "${PACKAGES[@]}"; do
    dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' \
      || die "package $p is not installed; run: $PROG install"
  done
  [ -x "$PY" ] || die "$PY not found"
}

uwsgi_bin() {
  if command -v uwsgi >/dev/null 2>&1; then command -v uwsgi
  elif [ -x /usr/bin/uwsgi-core ]; then echo /usr/bin/uwsgi-core
  else die "uwsgi not found; run: $PROG install"; fi
}

# ---------------------------------------------------------------- install
cmd_install() {
  local need=() p
  for p in "${PACKAGES[@]}"; do
    dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || need+=("$p")
  done
  if [ ${#need[@]} -eq 0 ]; then
    log "packages already installed: ${PACKAGES[*]}"
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "install needs root (missing: ${need[*]})"
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    log "creating /usr/sbin/policy-rc.d (exit 101): package scripts start no services"
    printf '#!/bin/sh\n# created by Canopy scripts/keystone.sh: no service starts from package scripts\nexit 101\n' \
      > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
  fi
  export DEBIAN_FRONTEND=noninteractive
  local apt=(apt-get -o DPkg::Lock::Timeout=600 -y -q --no-install-recommends)
  log "installing ${need[*]}"
  if ! "${apt[@]}" install "${need[@]}" >&2; then
    log "install failed; running apt-get update and retrying"
    apt-get -o DPkg::Lock::Timeout=600 -q update >&2 || die "apt-get update failed"
    "${apt[@]}" install "${need[@]}" >&2 || die "apt-get install ${need[*]} failed"
  fi
  log "installed"
}

# ---------------------------------------------------------------- config
# Both files are rewritten by `start` for the directory it serves, so a state
# directory can be copied anywhere (the only absolute paths are in etc/).
write_config() { # DIR PORT MODE(foreground|daemon)
  local dir=$1 port=$2 mode=$3
  mkdir -p "$dir/etc" "$dir/log"
  cat > "$dir/etc/keystone.conf.tmp" <<EOF
# Generated by scripts/keystone.sh for $dir; rewritten by every 'start'.
[DEFAULT]
log_file = $dir/log/keystone.log
use_stderr = false

[database]
# check_same_thread=false: keystone sometimes leaks a session whose connection the
# garbage collector then closes from another uwsgi thread (logged as an ERROR).
connection = sqlite:///$dir/keystone.db?check_same_thread=false

[token]
provider = fernet
expiration = $TOKEN_EXPIRATION

[fernet_tokens]
key_repository = $dir/fernet-keys

[fernet_receipts]
# (MFA receipts) the default, /etc/keystone/fernet-keys/, would be created as a
# side effect by bootstrap and the server; share the token keys instead
key_repository = $dir/fernet-keys

[credential]
key_repository = $dir/credential-keys

[cache]
# In-process cache: correct only because uwsgi runs ONE process (threads only).
# With several processes a revoked token could stay valid in another's cache.
enabled = true
backend = dogpile.cache.memory

[identity]
# bcrypt cost 4 instead of 12: password auth ~10 ms instead of ~300 ms. Tests only.
password_hash_rounds = 4
EOF
  mv -f "$dir/etc/keystone.conf.tmp" "$dir/etc/keystone.conf"

  local logline
  if [ "$mode" = daemon ]; then
    logline="daemonize = $dir/log/uwsgi.log"
  else
    logline="logto = $dir/log/uwsgi.log"
  fi
  cat > "$dir/etc/uwsgi.ini.tmp" <<EOF
# Generated by scripts/keystone.sh for $dir; rewritten by every 'start'.
[uwsgi]
plugins = python3
http-socket = 127.0.0.1:$port
wsgi-file = $WSGI_APP
master = true
processes = 1
threads = 4
lazy-apps = true
need-app = true
# SIGTERM stops (instead of reloading) in ~1 s. If the master is SIGKILLed the
# worker dies with it (uwsgi does that on Linux anyway; no-orphans makes sure).
die-on-term = true
no-orphans = true
# remove the pidfile on exit
vacuum = true
# skip Py_Finalize at worker exit: greenlet segfaults there (noise in the log)
skip-atexit-teardown = true
buffer-size = 65535
# http-socket has no keep-alive: tell clients, or pooled clients see resets
add-header = Connection: close
env = OS_KEYSTONE_CONFIG_DIR=$dir/etc
pidfile = $dir/uwsgi.pid
$logline
EOF
  mv -f "$dir/etc/uwsgi.ini.tmp" "$dir/etc/uwsgi.ini"
  echo "$port" > "$dir/port"
}

# Point the catalog's identity endpoints at this copy's port, so the catalog in
# tokens is right for whichever copy issued them.
fix_catalog() { # DIR PORT
  "$PY" - "$1/keystone.db" "http://127.0.0.1:$2/v3/" <<'EOF'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=30)
with db:
    db.execute("UPDATE endpoint SET url = ? WHERE service_id IN "
               "(SELECT id FROM service WHERE type = 'identity')", (sys.argv[2],))
db.close()
EOF
}

# ---------------------------------------------------------------- wait/stop
wait_ready() { # PORT TIMEOUT [PID]
  local port=$1 timeout=$2 pid=${3:-} code deadline=$((SECONDS + $2))
  while :; do
    code=$(curl -s --noproxy '*' -m 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v3" || true)
    [ "$code" = 200 ] && return 0
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      return 2
    fi
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

# uwsgi processes (master and workers) serving DIR: their command line names
# DIR/etc/uwsgi.ini. Used to make sure nothing is left behind.
procs_for() { # DIR
  local ini="$1/etc/uwsgi.ini" f p cmd
  for f in $(grep -lsaF -- "$ini" /proc/[0-9]*/cmdline 2>/dev/null); do
    cmd=$( { tr '\0' ' ' < "$f"; } 2>/dev/null ) || continue
    case "$cmd" in
      *uwsgi*" --ini $ini "*) p=${f#/proc/}; echo "${p%/cmdline}" ;;
    esac
  done
}

stop_dir() { # DIR
  local dir=$1 pid="" i
  [ -f "$dir/uwsgi.pid" ] && pid=$(cat "$dir/uwsgi.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "uwsgi $pid ignored SIGTERM for 15 s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  # leftover workers (e.g. the master was SIGKILLed)
  for i in $(seq 1 50); do
    local left
    left=$(procs_for "$dir")
    [ -z "$left" ] && break
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null || true
    sleep 0.1
  done
  rm -f "$dir/uwsgi.pid"
}

cmd_stop() {
  [ $# -eq 1 ] || die "usage: $PROG stop DIR"
  local dir
  dir=$(abspath "$1")
  [ -d "$dir" ] || die "$dir does not exist"
  if [ ! -s "$dir/uwsgi.pid" ] && [ -z "$(procs_for "$dir")" ]; then
    log "keystone is not running in $dir"
    return 0
  fi
  stop_dir "$dir"
  log "stopped keystone in $dir"
}

cmd_wait() {
  [ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $PROG wait PORT [SECS]"
  check_port "$1"
  wait_ready "$1" "${2:-$READY_TIMEOUT}" || die "http://127.0.0.1:$1/v3 not ready after ${2:-$READY_TIMEOUT}s"
}

# ---------------------------------------------------------------- start
start_checks() { # DIR PORT -> sets DIR_ABS
  [ $# -eq 2 ] || die "usage: $PROG start|start-bg DIR PORT"
  need_packages
  check_port "$2"
  DIR_ABS=$(abspath "$1")
  [ -f "$DIR_ABS/keystone.db" ] && [ -d "$DIR_ABS/fernet-keys" ] \
    || die "$DIR_ABS is not a prepared state directory (run: $PROG prepare TEMPLATE; cp -a TEMPLATE DIR)"
  local pid
  if [ -f "$DIR_ABS/uwsgi.pid" ]; then
    pid=$(cat "$DIR_ABS/uwsgi.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ -n "$(procs_for "$DIR_ABS")" ]; then
      die "keystone already running for $DIR_ABS (pid $pid)"
    fi
    rm -f "$DIR_ABS/uwsgi.pid"   # stale, or copied from a running template
  fi
  port_in_use "$2" && die "port $2 on 127.0.0.1 is already in use"
  return 0
}

cmd_start() {
  start_checks "$@"
  local dir=$DIR_ABS port=$2
  write_config "$dir" "$port" foreground
  fix_catalog "$dir" "$port"
  log "serving $dir on http://127.0.0.1:$port/v3 (foreground, pid $$; log $dir/log/uwsgi.log)"
  exec "$(uwsgi_bin)" --ini "$dir/etc/uwsgi.ini"
}

cmd_start_bg() {
  start_checks "$@"
  local dir=$DIR_ABS port=$2 pid rc=0
  write_config "$dir" "$port" daemon
  fix_catalog "$dir" "$port"
  "$(uwsgi_bin)" --ini "$dir/etc/uwsgi.ini" 2>>"$dir/log/uwsgi.log" \
    || die "uwsgi failed to start; see $dir/log/uwsgi.log"
  for _ in $(seq 1 50); do [ -s "$dir/uwsgi.pid" ] && break; sleep 0.1; done
  pid=$(cat "$dir/uwsgi.pid" 2>/dev/null || true)
  wait_ready "$port" "$READY_TIMEOUT" "$pid" || rc=$?
  if [ "$rc" != 0 ]; then
    tail -n 20 "$dir/log/uwsgi.log" >&2 || true
    stop_dir "$dir"
    [ "$rc" = 2 ] && die "uwsgi exited during startup; see $dir/log/uwsgi.log"
    die "keystone not ready on port $port after ${READY_TIMEOUT}s; see $dir/log/"
  fi
  log "ready: http://127.0.0.1:$port/v3 (pid $pid; stop with: $PROG stop $dir)"
}

# ---------------------------------------------------------------- prepare
free_port() {
  "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Creates the service user and tenants through the REST API; writes ids.json.
provision() { # DIR PORT; admin password in env ADMIN_PASSWORD
  "$PY" - "$@" <<'EOF'
import json, os, secrets, sys, urllib.error, urllib.request

state, port, admin_pw = sys.argv[1], sys.argv[2], os.environ["ADMIN_PASSWORD"]
url = "http://127.0.0.1:%s/v3" % port
# never through an http_proxy from the environment
urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({})))

def call(method, path, body=None, token=None, subject=None):
    req = urllib.request.Request(url + path, method=method,
                                 data=None if body is None else json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("X-Auth-Token", token)
    if subject:
        req.add_header("X-Subject-Token", subject)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
            return r.status, r.headers, (json.loads(data) if data else None)
    except urllib.error.HTTPError as e:
        sys.exit("[keystone] error: %s %s -> %s %s" % (method, path, e.code, e.read()[:500]))

def password_token(user, password, project):
    _, h, body = call("POST", "/auth/tokens", {"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"id": "default"}, "password": password}}},
        "scope": {"project": {"name": project, "domain": {"id": "default"}}}}})
    return h["X-Subject-Token"], body["token"]

adm, adm_tok = password_token("admin", admin_pw, "admin")

def find(kind, name):
    _, _, b = call("GET", "/%s?name=%s" % (kind, name), token=adm)
    return b[kind][0]["id"] if b[kind] else None

def role(name):
    rid = find("roles", name)
    if rid is None:
        _, _, b = call("POST", "/roles", {"role": {"name": name}}, token=adm)
        rid = b["role"]["id"]
    return rid

def project(name, description):
    pid = find("projects", name)
    if pid is None:
        _, _, b = call("POST", "/projects", {"project": {
            "name": name, "domain_id": "default", "description": description}}, token=adm)
        pid = b["project"]["id"]
    return pid

def user(name, password, project_id):
    uid = find("users", name)
    body = {"user": {"name": name, "domain_id": "default", "password": password,
                     "default_project_id": project_id}}
    if uid is None:
        _, _, b = call("POST", "/users", body, token=adm)
        uid = b["user"]["id"]
    else:
        body["user"].pop("domain_id")
        call("PATCH", "/users/" + uid, body, token=adm)
    return uid

def grant(project_id, user_id, role_id):
    call("PUT", "/projects/%s/users/%s/roles/%s" % (project_id, user_id, role_id), token=adm)

def pw():
    return secrets.token_urlsafe(18)

ids = {"domain_id": "default", "region": "RegionOne",
       "admin": {"user": "admin", "password": admin_pw, "project": "admin", "role": "admin",
                 "user_id": adm_tok["user"]["id"], "project_id": adm_tok["project"]["id"]}}

svc_pw = pw()
svc_project = project("service", "OpenStack service users")
svc_user = user("canopy", svc_pw, svc_project)
grant(svc_project, svc_user, role("service"))
ids["service"] = {"user": "canopy", "password": svc_pw, "project": "service", "role": "service",
                  "user_id": svc_user, "project_id": svc_project}

member = role("member")
ids["tenants"] = []
for proj, name in (("tenant-a", "alice"), ("tenant-b", "bob")):
    p = pw()
    pid = project(proj, "Canopy test tenant")
    uid = user(name, p, pid)
    grant(pid, uid, member)
    ids["tenants"].append({"project": proj, "project_id": pid, "user": name,
                           "user_id": uid, "password": p, "role": "member"})

# Check: every tenant user gets a scoped token, which the service user can validate.
svc_token, _ = password_token("canopy", svc_pw, "service")
for t in ids["tenants"]:
    tok, _ = password_token(t["user"], t["password"], t["project"])
    _, _, v = call("GET", "/auth/tokens?nocatalog", token=svc_token, subject=tok)
    v = v["token"]
    assert v["project"]["id"] == t["project_id"], v
    assert "member" in [r["name"] for r in v["roles"]], v

tmp = os.path.join(state, "ids.json.tmp")
with open(tmp, "w") as f:
    json.dump(ids, f, indent=2)
    f.write("\n")
os.chmod(tmp, 0o600)
os.rename(tmp, os.path.join(state, "ids.json"))
EOF
}

# The keystone-manage steps (one per line). They run in ONE python process:
# every keystone-manage run spends ~2 s importing keystone, so this takes ~2 s
# instead of ~8 s. If that fails (another keystone version?), fall back to one
# keystone-manage per step (every step is idempotent). The endpoint URLs are
# placeholders: every `start` rewrites them for its port.
km_steps() {
  local u g url=http://127.0.0.1:5000/v3/
  u=$(id -un); g=$(id -gn)
  cat <<EOF
db_sync
fernet_setup --keystone-user $u --keystone-group $g
credential_setup --keystone-user $u --keystone-group $g
bootstrap --bootstrap-username admin --bootstrap-project-name admin --bootstrap-role-name admin --bootstrap-service-name keystone --bootstrap-region-id RegionOne --bootstrap-admin-url $url --bootstrap-internal-url $url --bootstrap-public-url $url
EOF
}

keystone_manage_all() { # CONF LOG; admin password in env OS_BOOTSTRAP_PASSWORD
  local conf=$1 mlog=$2 steps args
  steps=$(km_steps)
  if "$PY" - "$conf" "$steps" >>"$mlog" 2>&1 <<'EOF'
import sys
conf, steps = sys.argv[1], [l.split() for l in sys.argv[2].splitlines() if l.strip()]
from keystone.cmd import cli
from keystone.conf import CONF
for step in steps:
    print("+ keystone-manage", *step, flush=True)
    try:
        cli.main(argv=["keystone-manage", "--config-file", conf] + step)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    CONF.clear()   # lets cli.main parse the next command line
EOF
  then
    return 0
  fi
  log "in-process keystone-manage failed (see log/keystone-manage.log); running keystone-manage step by step"
  while read -r -a args; do
    echo "+ keystone-manage ${args[*]}" >> "$mlog"
    keystone-manage --config-file "$conf" "${args[@]}" >>"$mlog" 2>&1 \
      || { tail -n 30 "$mlog" >&2; die "keystone-manage ${args[0]} failed; see $mlog"; }
  done <<< "$steps"
}

build_template() { # BUILD_DIR (empty, absolute)
  local dir=$1 admin_pw port pid rc
  admin_pw=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(18))')
  write_config "$dir" 5000 foreground
  mkdir -p "$dir/fernet-keys" "$dir/credential-keys"
  chmod 700 "$dir/fernet-keys" "$dir/credential-keys"
  log "keystone-manage db_sync, fernet_setup, credential_setup, bootstrap"
  OS_BOOTSTRAP_PASSWORD=$admin_pw \
    keystone_manage_all "$dir/etc/keystone.conf" "$dir/log/keystone-manage.log"

  # Temporary server for the REST part; retry if the free port got taken.
  local attempt
  for attempt in 1 2 3; do
    port=$(free_port)
    write_config "$dir" "$port" foreground
    log "starting a temporary keystone on 127.0.0.1:$port"
    "$(uwsgi_bin)" --ini "$dir/etc/uwsgi.ini" </dev/null >>"$dir/log/uwsgi.log" 2>&1 &
    pid=$!
    rc=0; wait_ready "$port" "$READY_TIMEOUT" "$pid" || rc=$?
    [ "$rc" = 0 ] && break
    kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
    stop_dir "$dir"
    [ "$rc" = 2 ] && [ "$attempt" -lt 3 ] && { log "uwsgi exited (port taken?); retrying"; continue; }
    tail -n 20 "$dir/log/uwsgi.log" >&2 || true
    die "temporary keystone did not come up"
  done
  log "creating service user, tenants and ids.json"
  rc=0; ADMIN_PASSWORD=$admin_pw provision "$dir" "$port" || rc=$?
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  stop_dir "$dir"
  [ "$rc" = 0 ] || die "provisioning failed"
  rm -f "$dir/port"
}

cmd_prepare() {
  [ $# -eq 1 ] || die "usage: $PROG prepare DIR"
  need_packages
  local dir parent base lock tmp t0=$SECONDS
  dir=$(abspath "$1")
  [ -f "$dir/ids.json" ] && { log "$dir already prepared"; return 0; }
  parent=$(dirname "$dir"); base=$(basename "$dir")
  lock="$parent/.$base.lock"
  # Serialize concurrent prepares of the same DIR; the first one builds it.
  exec 9>"$lock"
  flock 9
  if [ -f "$dir/ids.json" ]; then log "$dir already prepared"; return 0; fi
  if [ -e "$dir" ] && [ -n "$(ls -A "$dir" 2>/dev/null)" ]; then
    rm -f "$lock"
    die "$dir exists, is not empty and has no ids.json (a failed prepare?); remove it first"
  fi
  tmp=$(mktemp -d "$parent/.$base.build.XXXXXX")
  # On failure keep the build (logs) as .DIR.failed next to DIR, for debugging.
  trap 'stop_dir "$tmp" 2>/dev/null; rm -rf "$parent/.$base.failed"
        mv "$tmp" "$parent/.$base.failed" && log "failed build kept in $parent/.$base.failed"
        rm -f "$lock"' EXIT
  log "preparing template $dir"
  build_template "$tmp"
  # Rename into place (replaces DIR if it is an empty directory).
  [ -d "$dir" ] && rmdir "$dir"
  mv -T "$tmp" "$dir"
  trap - EXIT
  write_config "$dir" 5000 foreground   # paths for DIR itself; `start` rewrites anyway
  rm -f "$dir/port"
  # keep prepare's logs apart, so that a copy's log/ shows only its own runs
  mv "$dir/log/uwsgi.log" "$dir/log/prepare-uwsgi.log"
  mv "$dir/log/keystone.log" "$dir/log/prepare-keystone.log"
  exec 9>&-
  rm -f "$lock"
  log "prepared $dir in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- main
[ $# -ge 1 ] || { usage >&2; exit 2; }
cmd=$1; shift
case "$cmd" in
  -h|--help|help) usage ;;
  install)  [ $# -eq 0 ] || die "usage: $PROG install"; cmd_install ;;
  prepare)  cmd_prepare "$@" ;;
  start)    cmd_start "$@" ;;
  start-bg) cmd_start_bg "$@" ;;
  stop)     cmd_stop "$@" ;;
  wait)     cmd_wait "$@" ;;
  *) echo "[keystone] error: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
esac
