"""The soak: continuous syncs through a failover pair while agents, the hub and the SCIM server
are killed and restarted at random, then a check that the SCIM server holds exactly what the
directory and the access rule say.

Started by scripts/soak.sh (which builds the release binary and finds scim2-server); run it
through that script. Everything listens on 127.0.0.1; every file lives in one folder under
target/soak/, removed after a clean run unless --keep.

What runs, as separate processes: a real scim2-server (in-memory: a restart loses everything),
`connect hub`, and two `connect run` agents of one service (a failover pair). A directory of
--users people in teams, two departments of nested teams and a few directly granted users is
mutated between runs (renames, grants, revocations, new and departed people, group renames) so
that runs keep doing work. One thread forces syncs back to back through the admin API, one
reads the processes' resident memory, one reads the agents' `connect status --json`; the main
thread injects faults at random intervals drawn from --seed.

At the end the faults stop, every process is up again, a final sync must succeed and a second
one must find nothing to do, and scim2-server's own API is read: every desired user and group
must be there exactly once with the right attributes and members, and nothing else. The exit
code is 0 only when there are no duplicates, nothing missing, nothing extra, nothing wrong and
the final syncs were clean.

The fault schedule (which fault, when, how long an outage lasts) and the sequence of directory
states are reproducible from the seed; how they interleave with the runs is not.
"""

import argparse
import collections
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

APP = "soak"
TARGET = "scim"
SERVICE = "onprem"
# Test secrets of a throw-away deployment on loopback; never printed.
SERVICE_ID = "svc-soak-0123456789abcdef"
ADMIN_TOKEN = "soak-admin-token"
SCIM_TOKEN = "soak-scim-token"

# Seconds between two faults (uniform), and how often each kind is drawn.
FAULT_GAP = (2.0, 12.0)
FAULT_WEIGHTS = {
    "agent SIGKILL": 4,
    "agent SIGTERM": 2,
    "agent SIGSTOP": 3,
    "pair SIGKILL": 1,
    "hub SIGKILL": 3,
    "hub SIGTERM": 1,
    "scim restart": 1,
}
# How long a killed process stays down, a stopped agent stays frozen (crossing the hub's 6 s
# "silent" and 10 s "dropped" marks some of the time), seconds.
DOWN_FOR = (0.0, 4.0)
FROZEN_FOR = (1.0, 14.0)
# After the gap, a fault waits up to this long for a run to be going, so most land mid-run.
AIM_MID_RUN = 10.0

GRANTED_TEAMS = range(10, 20)
DEPT_A_TEAMS = range(0, 5)
DEPT_B_TEAMS = range(5, 10)
DIRECT_USERS = 5


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(what, timeout, check, every=0.1):
    """Calls `check` until it returns something truthy (returned) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:  # the thing is not there yet
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def http(method, url, token, body=None, timeout=30.0):
    """One request; (status, parsed JSON or None). Raises OSError when nothing answers."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}"}
    if data is not None:
        headers["Content-Type"] = "application/scim+json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read()
            return resp.status, (json.loads(text) if text else None)
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, {"raw": text.decode(errors="replace")}


# --- processes --------------------------------------------------------------------------------


class Proc:
    """One child process that the soak kills and starts again; its output is appended to
    `<dir>/<name>.log` across restarts."""

    def __init__(self, name, argv, cwd, env=None):
        self.name, self.argv, self.cwd = name, argv, cwd
        self.env = dict(os.environ, **(env or {}))
        self.log_path = os.path.join(cwd, f"{name}.log")
        self.popen = None
        self.frozen = False
        self.starts = 0

    def start(self):
        out = open(self.log_path, "ab")
        out.write(f"\n===== soak: start #{self.starts + 1} of {self.name} =====\n".encode())
        out.flush()
        # A session of its own: the soak's terminal signals do not reach it, the soak does.
        self.popen = subprocess.Popen(
            self.argv, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        self.frozen = False
        self.starts += 1

    @property
    def pid(self):
        return self.popen.pid if self.popen else None

    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def send(self, sig):
        if self.alive():
            os.kill(self.popen.pid, sig)
        if sig in (signal.SIGSTOP, signal.SIGCONT):
            self.frozen = sig == signal.SIGSTOP

    def stop(self, sig=signal.SIGTERM, grace=15.0):
        """Sends `sig` and waits for the exit; SIGKILL after `grace` seconds. Returns the exit
        code (negative: the signal that ended it)."""
        if not self.alive():
            return self.popen.returncode if self.popen else None
        if self.frozen:
            os.kill(self.popen.pid, signal.SIGCONT)
            self.frozen = False
        os.kill(self.popen.pid, sig)
        try:
            return self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log(f"{self.name} did not stop within {grace} s of {sig.name}: SIGKILL")
            os.kill(self.popen.pid, signal.SIGKILL)
            return self.popen.wait()

    def rss_kib(self):
        if not self.alive():
            return None
        try:
            with open(f"/proc/{self.popen.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None


# --- the directory and what it grants ---------------------------------------------------------


class Directory:
    """The hub's directory.json as a seeded model: teams of people, two departments nesting
    teams, and a fixed access rule (hub.toml) that grants the departments, ten teams and a few
    people directly. `mutate` changes it the way an identity source does between runs."""

    def __init__(self, users, rng):
        self.rng = rng
        self.generation = 0
        self.next_user = 1
        self.users = {}  # id -> user
        # Teams 20 and up are granted by nothing: their people come and go with grants.
        self.teams = max(30, min(60, users // 60))
        self.members = {t: set() for t in range(self.teams)}  # team -> user ids
        self.team_names = {t: f"team-{t:02d}" for t in range(self.teams)}
        self.dept_teams = {"a": set(DEPT_A_TEAMS), "b": set(DEPT_B_TEAMS)}
        for _ in range(users):
            self.add_user()

    # Ids: users u00001.., teams g-team-NN, departments g-dept-a / g-dept-b.
    @staticmethod
    def team_id(t):
        return f"g-team-{t:02d}"

    def grant_rule(self):
        groups = ["g-dept-a", "g-dept-b"] + [self.team_id(t) for t in GRANTED_TEAMS]
        users = [f"u{n:05d}" for n in range(1, DIRECT_USERS + 1)]
        return groups, users

    def add_user(self):
        n = self.next_user
        self.next_user += 1
        uid = f"u{n:05d}"
        self.users[uid] = {"n": n, "rev": 0, "active": True, "family": f"Family{n:05d}"}
        for t in self.rng.sample(range(self.teams), self.rng.choice((1, 1, 2))):
            self.members[t].add(uid)
        return uid

    def user_json(self, uid):
        u = self.users[uid]
        name = f"user{u['n']:05d}" + (f".r{u['rev']}" if u["rev"] else "") + "@example.org"
        doc = {
            "id": uid,
            "userName": name,
            "displayName": f"Given{u['n']:05d} {u['family']}",
            "name": {"givenName": f"Given{u['n']:05d}", "familyName": u["family"]},
            "emails": [{"value": name, "type": "work", "primary": True}],
        }
        if not u["active"]:
            doc["active"] = False
        return doc

    def to_json(self):
        groups = [{"id": self.team_id(t), "displayName": self.team_names[t],
                   "members": [{"value": u, "type": "User"} for u in sorted(self.members[t])]}
                  for t in range(self.teams)]
        for dept, teams in sorted(self.dept_teams.items()):
            groups.append({"id": f"g-dept-{dept}", "displayName": f"department-{dept}",
                           "members": [{"value": self.team_id(t), "type": "Group"}
                                       for t in sorted(teams)]})
        return {"users": [self.user_json(u) for u in sorted(self.users)], "groups": groups}

    def write(self, path):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f)
        os.replace(tmp, path)  # the hub reads it at the start of every run

    def mutate(self):
        """One step of churn, about 1% of the people; returns what changed, by kind."""
        rng, done = self.rng, collections.Counter()
        self.generation += 1
        k = max(1, len(self.users) // 100)
        removable = [u for u in self.users if self.users[u]["n"] > DIRECT_USERS]
        for uid in rng.sample(sorted(self.users), min(k, len(self.users))):
            u = self.users[uid]
            u["rev"] += 1
            if rng.random() < 0.5:
                u["family"] = f"Family{u['n']:05d}v{u['rev']}"
            done["user renamed"] += 1
        for uid in rng.sample(sorted(self.users), min(k, len(self.users))):
            old = [t for t in range(self.teams) if uid in self.members[t]]
            if old:
                self.members[rng.choice(old)].discard(uid)
            self.members[rng.randrange(self.teams)].add(uid)
            done["user moved between teams"] += 1
        for _ in range(max(1, k // 2)):
            self.add_user()
            done["user joined"] += 1
        for uid in rng.sample(sorted(removable), min(max(1, k // 2), len(removable))):
            del self.users[uid]
            for m in self.members.values():
                m.discard(uid)
            done["user left"] += 1
        if rng.random() < 0.3:
            uid = rng.choice(sorted(self.users))
            self.users[uid]["active"] = not self.users[uid]["active"]
            done["user (de)activated"] += 1
        if rng.random() < 0.2:
            t = rng.choice(list(GRANTED_TEAMS) + list(DEPT_A_TEAMS))
            self.team_names[t] = f"team-{t:02d}-v{self.generation}"
            done["group renamed"] += 1
        if rng.random() < 0.05:
            # A team changes department, or leaves one: a whole team granted or revoked.
            t = rng.randrange(self.teams)
            for teams in self.dept_teams.values():
                teams.discard(t)
            if rng.random() < 0.5:
                self.dept_teams[rng.choice("ab")].add(t)
            done["team re-nested"] += 1
        return done

    def desired(self):
        """What the application must hold: users by id (their SCIM shape) and groups by id
        (displayName, member user ids). Computed here from the rule, independently of the hub."""
        doc = self.to_json()
        users = {u["id"]: u for u in doc["users"]}
        groups = {g["id"]: g for g in doc["groups"]}
        rule_groups, rule_users = self.grant_rule()

        def flatten(gid, seen):
            if gid in seen or gid not in groups:
                return set()
            seen.add(gid)
            out = set()
            for m in groups[gid]["members"]:
                if m["type"] == "Group":
                    out |= flatten(m["value"], seen)
                elif m["value"] in users:
                    out.add(m["value"])
            return out

        granted_groups = {g: flatten(g, set()) for g in rule_groups if g in groups}
        granted_users = {u for u in rule_users if u in users}
        for members in granted_groups.values():
            granted_users |= members
        return ({u: users[u] for u in granted_users},
                {g: {"displayName": groups[g]["displayName"], "members": m}
                 for g, m in granted_groups.items()})


# --- the deployment ---------------------------------------------------------------------------


def make_certs(folder):
    """A test CA and a hub certificate for localhost / 127.0.0.1 (openssl)."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=soak test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "hub-key.pem", "-out", "hub.csr", "-subj", "/CN=localhost")
    with open(os.path.join(folder, "hub.ext"), "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "hub.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "hub-cert.pem", "-days", "2", "-extfile", "hub.ext")


class Deployment:
    def __init__(self, folder, connect, scim2_server, directory):
        self.folder = folder
        self.scim_port, self.hub_port, self.admin_port = free_port(), free_port(), free_port()
        self.scim_base = f"http://127.0.0.1:{self.scim_port}/v2"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        make_certs(folder)
        directory.write(os.path.join(folder, "directory.json"))
        groups, users = directory.grant_rule()
        with open(os.path.join(folder, "hub.toml"), "w") as f:
            f.write(f"""listen = "127.0.0.1:{self.hub_port}"
tls_cert = "hub-cert.pem"
tls_key = "hub-key.pem"
state_dir = "hub-state"
directory = "directory.json"

[admin]
listen = "127.0.0.1:{self.admin_port}"
token = "{ADMIN_TOKEN}"

[[services]]
name = "{SERVICE}"
service_id = "{SERVICE_ID}"

[apps.{APP}]
base_url = "http://scim.internal.example:{self.scim_port}/v2"
service = "{SERVICE}"
target = "{TARGET}"
auth = "bearer"
token = "{SCIM_TOKEN}"
deprovision = "delete"
interval = "1m"
request_timeout = "10s"
grant_groups = {json.dumps(groups)}
grant_users = {json.dumps(users)}
""")
        self.scim = Proc("scim2-server", [scim2_server, "--hostname", "127.0.0.1", "--port",
                                          str(self.scim_port), "--bearer-token", SCIM_TOKEN],
                         folder)
        self.hub = Proc("hub", [connect, "hub", "--config", "hub.toml"], folder,
                        {"RUST_LOG": "info"})
        self.agents = {}
        for name in ("a", "b"):
            ini = os.path.join(folder, f"{name}.ini")
            with open(ini, "w") as f:
                f.write(f"service_id = {SERVICE_ID}\nstate_dir = {name}-state\n"
                        f"hub = wss://localhost:{self.hub_port}/v1/connect\nhub_ca = ca.pem\n"
                        f"agent_name = {name}\n\n"
                        f"[target.{TARGET}]\naddr = 127.0.0.1:{self.scim_port}\n")
            os.chmod(ini, 0o600)
            self.agents[name] = Proc(f"agent-{name}", [connect, "run", "--config", ini], folder,
                                     {"RUST_LOG": "info"})
        self.connect = connect

    def processes(self):
        return [self.scim, self.hub, *self.agents.values()]

    def start_scim(self):
        self.scim.start()
        poll("scim2-server to answer", 30, lambda: http(
            "GET", self.scim_base + "/ServiceProviderConfig", SCIM_TOKEN, timeout=2)[0] == 200)

    def start_hub(self):
        self.hub.start()
        poll("the hub's admin API", 30, lambda: self.api("GET", "/api/runtime", timeout=2)[0] == 200)

    def api(self, method, path, timeout=30.0):
        return http(method, self.admin + path, ADMIN_TOKEN, timeout=timeout)

    def registered(self):
        """Names of the agents the hub lists as connected and healthy."""
        status, services = self.api("GET", "/api/services", timeout=5)
        if status != 200:
            return set()
        return {a.get("agent_name") for s in services if s["name"] == SERVICE
                for a in s.get("agents", []) if a.get("health") == "healthy"}

    def agent_status(self, name):
        out = subprocess.run([self.connect, "status", "--json", "--config",
                              os.path.join(self.folder, f"{name}.ini")],
                             capture_output=True, timeout=10)
        if out.returncode == 2:
            return None
        return json.loads(out.stdout)

    def scim_list(self, resource):
        """Every resource scim2-server holds, page by page."""
        found, start = [], 1
        while True:
            status, page = http("GET", f"{self.scim_base}/{resource}?startIndex={start}&count=1000",
                                SCIM_TOKEN, timeout=60)
            if status != 200:
                raise RuntimeError(f"GET /{resource} answered {status}: {page}")
            batch = page.get("Resources", [])
            found += batch
            start += len(batch)
            if not batch or len(found) >= page["totalResults"]:
                return found


# --- what runs alongside the faults -----------------------------------------------------------


class Soak:
    def __init__(self, args, folder):
        self.args = args
        self.dir = Directory(args.users, random.Random(f"{args.seed}/directory"))
        self.d = Deployment(folder, args.connect, args.scim2_server, self.dir)
        self.fault_rng = random.Random(f"{args.seed}/faults")
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # the syncer stops after its run
        self.done = threading.Event()  # the pollers stop
        self.running_since = None  # monotonic start of the forced sync in flight
        self.client_runs = collections.Counter()
        self.failure_messages = collections.Counter()
        self.mutations = collections.Counter()
        self.faults = collections.Counter()
        self.faults_mid_run = 0
        self.max_rss = {"hub": 0, "agent": 0, "scim2-server": 0}
        self.rss_after_first_sync = {}
        self.forwarded = {}  # (agent, pid) -> (forwarded, errors), the last seen
        self.longest_run = 0.0
        self.syncer_error = None

    # The syncer: mutate, force a run, record how it ended; over and over.
    def syncer(self):
        try:
            first = True
            while not self.stopping.is_set():
                if not first and self.dir.rng.random() < 0.8:
                    self.mutations.update(self.dir.mutate())
                    self.dir.write(os.path.join(self.d.folder, "directory.json"))
                self.force_sync()
                if first:
                    self.rss_after_first_sync = {p.name: p.rss_kib() for p in self.d.processes()}
                first = False
        except Exception as e:  # reported at the end; the soak fails
            self.syncer_error = repr(e)
            log(f"syncer stopped: {e!r}")

    def force_sync(self):
        """POST /api/apps/<app>/sync once; waits for the admin API while the hub is down."""
        with self.lock:
            self.running_since = time.monotonic()
        try:
            status, run = self.d.api("POST", f"/api/apps/{APP}/sync", timeout=900)
        except OSError as e:
            kind = "hub went away" if self.d.hub.starts else "error"
            self.client_runs[kind] += 1
            with self.lock:
                self.running_since = None
            # Wait for a hub to answer again (the fault thread restarts it).
            poll("the hub's admin API again", 120,
                 lambda: self.stopping.is_set() or self.d.api("GET", "/api/runtime", 2)[0] == 200,
                 every=0.2)
            return None
        took = time.monotonic() - self.running_since
        with self.lock:
            self.running_since = None
            self.longest_run = max(self.longest_run, took)
        if status != 200:
            self.client_runs[f"API {status}"] += 1
            return None
        self.client_runs["joined" if run.get("joined") else "started"] += 1
        if run["ok"] and not run.get("failed"):
            self.client_runs["ok"] += 1
        else:
            self.client_runs["failed"] += 1
            self.failure_messages[first_words(run.get("message") or "(no message)")] += 1
        return run

    def rss_poller(self):
        while not self.done.is_set():
            for p in self.d.processes():
                kib = p.rss_kib()
                if kib:
                    role = "agent" if p.name.startswith("agent") else p.name
                    self.max_rss[role] = max(self.max_rss[role], kib)
            time.sleep(0.25)

    def sample_agent(self, name):
        agent = self.d.agents[name]
        if not agent.alive() or agent.frozen:
            return
        try:
            report = self.d.agent_status(name)
        except (subprocess.TimeoutExpired, ValueError):
            return
        if report and report.get("pid") == agent.pid:
            t = next((t for t in report["targets"] if t["name"] == TARGET), None)
            if t:
                self.forwarded[(name, agent.pid)] = (t["forwarded"], t["errors"])

    def status_poller(self):
        while not self.done.is_set():
            for name in self.d.agents:
                self.sample_agent(name)
            self.done.wait(2.0)

    # Faults: the main thread.
    def inject(self, kind):
        rng, d = self.fault_rng, self.d
        down = rng.uniform(*DOWN_FOR)
        if kind.startswith("agent"):
            name = rng.choice("ab")
            agent = d.agents[name]
            self.sample_agent(name)
            if kind == "agent SIGSTOP":
                agent.send(signal.SIGSTOP)
                time.sleep(rng.uniform(*FROZEN_FOR))
                agent.send(signal.SIGCONT)
                return
            agent.stop(signal.SIGKILL if kind == "agent SIGKILL" else signal.SIGTERM)
            time.sleep(down)
            agent.start()
        elif kind == "pair SIGKILL":
            for name, agent in d.agents.items():
                self.sample_agent(name)
                agent.stop(signal.SIGKILL)
            time.sleep(down)
            for agent in d.agents.values():
                agent.start()
        elif kind.startswith("hub"):
            d.hub.stop(signal.SIGKILL if kind == "hub SIGKILL" else signal.SIGTERM)
            time.sleep(down)
            d.start_hub()
        elif kind == "scim restart":
            d.scim.stop(signal.SIGKILL)
            time.sleep(down)
            d.start_scim()

    def faults_until(self, deadline):
        kinds, weights = zip(*FAULT_WEIGHTS.items())
        while True:
            gap = self.fault_rng.uniform(*FAULT_GAP)
            kind = self.fault_rng.choices(kinds, weights)[0]
            aim = self.fault_rng.uniform(0.0, 1.5)
            if time.monotonic() + gap > deadline:
                return
            time.sleep(gap)
            try:
                poll("a run to be going", AIM_MID_RUN, lambda: self.running_since is not None,
                     every=0.05)
                time.sleep(aim)
            except TimeoutError:
                pass
            if self.running_since is not None:
                self.faults_mid_run += 1
            log(f"fault: {kind}")
            self.inject(kind)
            self.faults[kind] += 1

    def settle(self):
        """Every process up and unfrozen, both agents registered and healthy."""
        d = self.d
        if not d.scim.alive():
            d.start_scim()
        for agent in d.agents.values():
            if agent.frozen:
                agent.send(signal.SIGCONT)
            if not agent.alive():
                agent.start()
        if not d.hub.alive():
            d.start_hub()
        poll("both agents registered and healthy", 90, lambda: d.registered() >= {"a", "b"},
             every=0.2)

    def hub_at_rest(self):
        """The hub's runtime figures once the last run's per-request deadline timers (request
        timeout + 2 s each) have run out: read every second until the task count has not
        fallen for 3 s, at most 30 s."""
        best, steady, deadline = None, 0, time.monotonic() + 30
        while time.monotonic() < deadline and steady < 3:
            now = self.d.api("GET", "/api/runtime")[1]
            if best is None or now["tasks"] < best["tasks"]:
                best, steady = now, 0
            else:
                steady += 1
            time.sleep(1.0)
        return best

    def run_history(self):
        """Every run the hub recorded (its history keeps the last 1000)."""
        runs, before = [], None
        while True:
            query = f"?limit=500" + (f"&before={before}" if before else "")
            status, page = self.d.api("GET", f"/api/apps/{APP}/runs{query}")
            runs += page["runs"]
            before = page.get("next_before")
            if not before:
                return runs


def first_words(message, n=12):
    return " ".join(message.split()[:n])


# --- the convergence check --------------------------------------------------------------------


def check(d, directory):
    """Compares what scim2-server holds with what the directory grants. Returns counts and a
    few examples of each kind of difference."""
    want_users, want_groups = directory.desired()
    users = d.scim_list("Users")
    groups = d.scim_list("Groups")
    found = collections.Counter()
    examples = collections.defaultdict(list)

    def note(kind, what):
        found[kind] += 1
        if len(examples[kind]) < 5:
            examples[kind].append(what)

    by_ext = collections.defaultdict(list)
    for u in users:
        by_ext[u.get("externalId")].append(u)
    by_name = collections.Counter(u["userName"].lower() for u in users)
    for name, n in by_name.items():
        if n > 1:
            note("duplicates", f"userName {name} x{n}")
    scim_id_to_ext = {u["id"]: u.get("externalId") for u in users}
    for ext, copies in by_ext.items():
        if ext not in want_users:
            for u in copies:
                note("extra", f"user {u['userName']} (externalId {ext})")
            continue
        if len(copies) > 1:
            for _ in copies[1:]:
                note("duplicates", f"user externalId {ext} x{len(copies)}")
        diff = user_diff(want_users[ext], copies[0])
        if diff:
            note("wrong", f"user {ext}: {diff}")
    for ext in want_users:
        if ext not in by_ext:
            note("missing", f"user {ext} ({want_users[ext]['userName']})")

    g_by_ext = collections.defaultdict(list)
    for g in groups:
        g_by_ext[g.get("externalId")].append(g)
    g_by_name = collections.Counter(g["displayName"].lower() for g in groups)
    for name, n in g_by_name.items():
        if n > 1:
            note("duplicates", f"group displayName {name} x{n}")
    for ext, copies in g_by_ext.items():
        if ext not in want_groups:
            for g in copies:
                note("extra", f"group {g['displayName']} (externalId {ext})")
            continue
        if len(copies) > 1:
            for _ in copies[1:]:
                note("duplicates", f"group externalId {ext} x{len(copies)}")
        g, want = copies[0], want_groups[ext]
        if g["displayName"] != want["displayName"]:
            note("wrong", f"group {ext}: displayName {g['displayName']!r} != {want['displayName']!r}")
        values = [m["value"] for m in g.get("members", [])]
        dangling = [v for v in values if v not in scim_id_to_ext]
        members = [scim_id_to_ext[v] for v in values if v in scim_id_to_ext]
        if dangling:
            note("wrong", f"group {ext}: {len(dangling)} member(s) that are no user")
        if len(members) != len(set(members)):
            note("duplicates", f"group {ext}: a member listed twice")
        if set(members) != want["members"]:
            extra = sorted(set(members) - want["members"])[:3]
            lacking = sorted(want["members"] - set(members))[:3]
            note("wrong", f"group {ext}: members +{extra} -{lacking}")
    for ext in want_groups:
        if ext not in g_by_ext:
            note("missing", f"group {ext} ({want_groups[ext]['displayName']})")
    return {
        "desired users": len(want_users), "desired groups": len(want_groups),
        "users held": len(users), "groups held": len(groups),
        **{k: found[k] for k in ("duplicates", "missing", "extra", "wrong")},
    }, examples


def user_diff(want, got):
    """The attributes of `got` (a SCIM User) that differ from `want` (a directory user)."""
    def emails(items):
        return sorted((e.get("value"), e.get("type"), bool(e.get("primary"))) for e in items or [])
    pairs = {
        "userName": (want["userName"], got.get("userName")),
        "displayName": (want.get("displayName"), got.get("displayName")),
        "givenName": (want["name"]["givenName"], (got.get("name") or {}).get("givenName")),
        "familyName": (want["name"]["familyName"], (got.get("name") or {}).get("familyName")),
        "active": (want.get("active", True), got.get("active")),
        "emails": (emails(want.get("emails")), emails(got.get("emails"))),
    }
    return ", ".join(f"{k} {g!r} != {w!r}" for k, (w, g) in pairs.items() if w != g)


# --- main -------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(prog="scripts/soak.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long faults go on (10)")
    p.add_argument("--users", type=int, default=3000, help="people in the directory (3000)")
    p.add_argument("--seed", type=int, default=None, help="seed of faults and churn (random)")
    p.add_argument("--keep", action="store_true", help="keep the soak folder after a clean run")
    p.add_argument("--connect", required=True, help=argparse.SUPPRESS)
    p.add_argument("--scim2-server", required=True, help=argparse.SUPPRESS)
    p.add_argument("--out", required=True, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 1_000_000)
    if args.users < 100:
        p.error("--users must be at least 100 (teams of a few people each)")
    reproduce = f"scripts/soak.sh --minutes {args.minutes:g} --users {args.users} --seed {args.seed}"

    os.makedirs(args.out, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=args.out)
    log(f"{reproduce}  (folder {folder}, load {os.getloadavg()[0]:.2f})")
    soak = Soak(args, folder)
    d = soak.d
    threads = []
    try:
        d.start_scim()
        d.start_hub()
        for agent in d.agents.values():
            agent.start()
        poll("both agents registered", 60, lambda: d.registered() >= {"a", "b"})
        want_users, want_groups = soak.dir.desired()
        log(f"{len(soak.dir.users)} people, {len(want_users)} granted, {len(want_groups)} groups "
            f"granted; faults for {args.minutes:g} min")

        threads = [threading.Thread(target=t, daemon=True)
                   for t in (soak.syncer, soak.rss_poller, soak.status_poller)]
        for t in threads:
            t.start()
        started = time.monotonic()
        soak.faults_until(started + args.minutes * 60)
        fault_time = time.monotonic() - started

        log("faults over: settling")
        soak.stopping.set()
        soak.settle()
        threads[0].join(timeout=900)
        if threads[0].is_alive():
            raise TimeoutError("the last forced sync did not end within 900 s")
        soak.settle()
        final = [soak.force_sync() for _ in range(2)]
        if not (final[0] and final[0]["ok"]):
            log("final sync not clean, one more (a fault may have ended just before)")
            final = [final[1], soak.force_sync()]
        for name in d.agents:
            soak.sample_agent(name)
        result, examples = check(d, soak.dir)
        history = soak.run_history()
        runtime = soak.hub_at_rest()
        soak.done.set()
    finally:
        soak.done.set()
        soak.stopping.set()
        for proc in d.processes():
            proc.stop()

    panics = sum(open(p.log_path, errors="replace").read().count("panicked")
                 for p in d.processes() if os.path.exists(p.log_path))
    last = final[-1] or {}
    noop = bool(last.get("ok")) and not any(
        last.get(k) for k in ("created", "updated", "deactivated", "deleted", "failed")) and not any(
        (last.get("groups") or {}).get(k) for k in ("created", "updated", "deleted", "failed"))
    states = collections.Counter(
        "interrupted" if r.get("state") == "interrupted" else
        ("ok" if r["ok"] and not r.get("failed") else "failed") for r in history)
    forwarded = sum(f for f, _ in soak.forwarded.values())
    forward_errors = sum(e for _, e in soak.forwarded.values())

    def mib(kib):
        return f"{kib / 1024:.1f} MiB"

    lines = [
        f"soak of {fault_time / 60:.1f} min, seed {args.seed}, {args.users} people "
        f"({result['desired users']} granted, {result['desired groups']} groups)",
        f"runs (hub's history): {sum(states.values())}: {states['ok']} ok, {states['failed']} "
        f"failed, {states['interrupted']} interrupted"
        + (" (the history keeps the last 1000)" if len(history) >= 1000 else ""),
        f"  forced by the soak: {dict(soak.client_runs)}; longest {soak.longest_run:.1f} s",
        f"  requests sent by runs: {sum(r.get('requests', 0) for r in history)}, retries "
        f"{sum(r.get('retries', 0) for r in history)}, re-routed "
        f"{sum(r.get('rerouted', 0) for r in history)}, runs that lost an agent "
        f"{sum(1 for r in history if r.get('agents_lost'))}",
        f"faults injected: {sum(soak.faults.values())} ({soak.faults_mid_run} mid-run): "
        + ", ".join(f"{k} {v}" for k, v in sorted(soak.faults.items())),
        f"directory churn: " + ", ".join(f"{k} {v}" for k, v in sorted(soak.mutations.items())),
        f"requests forwarded (agents' status): {forwarded}, forward errors {forward_errors}",
        f"failures: {states['failed']} failed runs; causes (of the soak's forced runs): "
        + ("; ".join(f"{n}x {m}" for m, n in soak.failure_messages.most_common(6)) or "none"),
        f"final syncs: {'ok' if final[0] and final[0]['ok'] else 'FAILED'}, then "
        f"{'nothing left to do' if noop else 'NOT a no-op: ' + json.dumps(last)[:300]}",
        f"scim2-server holds {result['users held']} users, {result['groups held']} groups",
        f"duplicates: {result['duplicates']}",
        f"missing: {result['missing']}",
        f"extra: {result['extra']}, wrong attributes or members: {result['wrong']}",
        f"max RSS: agent {mib(soak.max_rss['agent'])}, hub {mib(soak.max_rss['hub'])} "
        f"(after the first sync: agent-a {mib(soak.rss_after_first_sync.get('agent-a') or 0)}, "
        f"hub {mib(soak.rss_after_first_sync.get('hub') or 0)}; hub at rest at the "
        f"end {mib((runtime.get('rss_bytes') or 0) / 1024)}, {runtime.get('tasks')} tasks, "
        f"{runtime.get('agent_sessions')} agent sessions)",
        f"panics in logs: {panics}",
        f"reproduce: {reproduce}",
    ]
    for kind, items in examples.items():
        for item in items:
            lines.append(f"  {kind}: {item}")
    if soak.syncer_error:
        lines.append(f"syncer failed: {soak.syncer_error}")
    print("\n==== soak result ====\n" + "\n".join(lines), flush=True)

    clean = (result["duplicates"] == 0 and result["missing"] == 0 and result["extra"] == 0
             and result["wrong"] == 0 and final[0] and final[0]["ok"] and noop and panics == 0
             and not soak.syncer_error)
    if clean and not args.keep:
        shutil.rmtree(folder)
    else:
        print(f"folder kept: {folder}")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
