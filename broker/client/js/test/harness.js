// Real processes for the client's tests: a redis-server and `python -m broker serve` on free loopback ports.
// Every wait is bounded; stop() ends both processes (SIGKILL when they do not go in time).
import { spawn } from "node:child_process";
import { mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { createServer, connect as tcpConnect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");
const PYTHON = process.env.BROKER_PYTHON ?? join(REPO, ".venv/bin/python");
const START_TIMEOUT_MS = 20_000;

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Resolve with p's value, or reject after ms (every wait of the tests is bounded by this). */
export function within(ms, p, what = "operation") {
  let timer;
  const t = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: nothing within ${ms} ms`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

/** Poll `check` every 50 ms until it returns a truthy value, at most ms. */
export async function until(ms, check, what) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    const v = await check();
    if (v) return v;
    await sleep(50);
  }
  throw new Error(`${what}: not within ${ms} ms`);
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function redisPing(port) {
  return new Promise((resolve) => {
    const s = tcpConnect({ host: "127.0.0.1", port }, () => s.write("PING\r\n"));
    s.setTimeout(500, () => { s.destroy(); resolve(false); });
    s.on("data", (d) => { s.destroy(); resolve(d.toString().startsWith("+PONG")); });
    s.on("error", () => resolve(false));
  });
}

async function exited(proc, ms) {
  if (proc.exitCode !== null || proc.signalCode !== null) return true;
  return within(ms, new Promise((r) => proc.once("exit", () => r(true))), "exit").catch(() => false);
}

export class Processes {
  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), "broker-js-"));
    this.redis = null;
    this.broker = null;
  }

  /** (Re)start redis-server; the port and data folder stay the same across restarts (the AOF is reloaded). */
  async startRedis() {
    this.redisPort ??= await freePort();
    this.redis = spawn("redis-server", [
      "--port", String(this.redisPort), "--bind", "127.0.0.1", "--dir", this.dir, "--save", "",
      "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no",
    ], { stdio: "ignore" });
    await until(START_TIMEOUT_MS, () => redisPing(this.redisPort), "redis-server PING");
  }

  /** (Re)start the broker; the port stays the same across restarts. */
  async startBroker(env = {}) {
    this.brokerPort ??= await freePort();
    this.brokerEnv = { ...(this.brokerEnv ?? {}), ...env };
    const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("BROKER_")));
    this.logPath = join(this.dir, "broker.log");
    const log = openSync(this.logPath, "a");
    this.broker = spawn(PYTHON, ["-m", "broker", "--config", join(REPO, "config/broker.toml"), "serve"], {
      cwd: REPO,
      stdio: ["ignore", log, log],
      env: {
        ...clean,
        PYTHONUNBUFFERED: "1",
        BROKER_LOG_FORMAT: "json",
        BROKER_REDIS_URL: `redis://127.0.0.1:${this.redisPort}/0`,
        BROKER_SERVER_PORT: String(this.brokerPort),
        BROKER_SERVER_HOST: "127.0.0.1",
        ...this.brokerEnv,
      },
    });
    const proc = this.broker;
    await until(START_TIMEOUT_MS, async () => {
      if (proc.exitCode !== null) throw new Error(`broker exited with ${proc.exitCode}:\n${this.brokerLog()}`);
      try {
        return (await fetch(`${this.http}/healthz`)).status === 200;
      } catch {
        return false;
      }
    }, "broker /healthz");
  }

  get url() {
    return `ws://127.0.0.1:${this.brokerPort}/`;
  }

  get http() {
    return `http://127.0.0.1:${this.brokerPort}`;
  }

  brokerLog() {
    try {
      return readFileSync(this.logPath, "utf8").split("\n").slice(-30).join("\n");
    } catch {
      return "(no log)";
    }
  }

  async killRedis() {
    if (!this.redis) return;
    this.redis.kill("SIGKILL");
    await exited(this.redis, 10_000);
    this.redis = null;
  }

  async killBroker() {
    if (!this.broker) return;
    this.broker.kill("SIGKILL");
    await exited(this.broker, 10_000);
    this.broker = null;
  }

  async stop() {
    for (const name of ["broker", "redis"]) {
      const proc = this[name];
      if (!proc) continue;
      proc.kill("SIGTERM");
      if (!(await exited(proc, 10_000))) {
        proc.kill("SIGKILL");
        await exited(proc, 5_000);
      }
      this[name] = null;
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}
