// node-redlock (v4, the npm "latest" tag) with ioredis, measured the way `dlock bench`
// measures dlock. Prints one JSON object per run.
//   node node_peers.mjs --client redlock|redlock-tuned --url redis://… --mode uncontended|handoff -c N --seconds S
//   node node_peers.mjs --client redlock --url … --mode hold --key K --hold-ms H
//     (takes K for 5 s, prints "held", holds H ms, releases, prints "released <unix ns>")
import Redis from "ioredis";
import Redlock from "redlock";
import { randomBytes } from "node:crypto";

const argv = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1] : dflt;
};
const client = opt("--client");
const url = opt("--url");
const mode = opt("--mode", "uncontended");
const concurrency = Number(opt("-c", "1"));
const seconds = Number(opt("--seconds", "10"));
const holdMs = Number(opt("--hold-ms", "5"));

const redis = new Redis(url);
const settings = client === "redlock-tuned"
  ? { retryCount: -1, retryDelay: 5, retryJitter: 5 }
  : {}; // defaults: retryCount 10, retryDelay 200 ms, retryJitter 200 ms
const redlock = new Redlock([redis], settings);
redlock.on("clientError", () => {});

const now = () => Number(process.hrtime.bigint()) / 1e9;
function percentiles(samples) {
  if (samples.length === 0) return { count: 0 };
  samples.sort((a, b) => a - b);
  const at = (q) => samples[Math.min(samples.length - 1, Math.round((samples.length - 1) * q))] * 1e6;
  return { count: samples.length, p10_us: at(0.1), p25_us: at(0.25), p50_us: at(0.5), p75_us: at(0.75),
           p90_us: at(0.9), p99_us: at(0.99), max_us: at(1) };
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function uncontended() {
  const start = now(), until = start + seconds, samples = [];
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (now() < until) {
      const t = now();
      const lock = await redlock.lock("peer-" + randomBytes(8).toString("hex"), 30000);
      samples.push(now() - t);
      await lock.unlock();
    }
  }));
  const s = now() - start;
  return { operations: samples.length, seconds: s, per_second: samples.length / s, acquire: percentiles(samples) };
}

async function handoff() {
  const name = "peer-" + randomBytes(8).toString("hex");
  const start = now(), until = start + seconds, samples = [];
  let releasedAt = null, generation = 0, ops = 0;
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (now() < until) {
      let lock;
      try { lock = await redlock.lock(name, 30000); } catch { continue; }
      if (releasedAt !== null) { samples.push(now() - releasedAt); releasedAt = null; }
      const mine = ++generation;
      await sleep(holdMs);
      releasedAt = now();
      await lock.unlock();
      ops++;
      while (generation <= mine && now() < until) await sleep(1);
    }
  }));
  const s = now() - start;
  return { operations: ops, seconds: s, per_second: ops / s, handoff: percentiles(samples) };
}

if (mode === "hold") {
  const lock = await redlock.lock(opt("--key"), 5000);
  console.log("held");
  await sleep(holdMs);
  await lock.unlock();
  console.log("released", (BigInt(Date.now()) * 1000000n).toString());
  redis.disconnect();
  process.exit(0);
}
const report = mode === "handoff" ? await handoff() : await uncontended();
report.client = client === "redlock-tuned" ? "node-redlock (retry 5ms)" : "node-redlock (default retry)";
report.mode = mode;
report.concurrency = concurrency;
console.log(JSON.stringify(report));
redis.disconnect();
