#!/usr/bin/env node
/**
 * A fedfleet device: checks in, honours reconnect windows and Retry-After, long-polls for its
 * task, downloads the checkpoint, trains the built-in softmax task on its local examples and
 * reports the update; it repeats until stopped (SIGTERM/SIGINT), `--reports N` accepted
 * reports, or `--max-seconds`. One JSON line per event goes to stdout.
 *
 *   node dist/device.js --server URL --device ID --token TOKEN --population NAME --data FILE
 *        [--reports N] [--max-seconds S] [--seed N] [--rest S]
 */

import { readFileSync } from "node:fs";

import { loadExamples } from "./data.js";
import { Busy, Refused, Selection, SelectorClient, TaskDescription, Unreachable, Window } from "./protocol.js";
import { clip, rng, train } from "./softmax.js";

const BUILTIN = "fedfleet.tasks.builtin:task";
const PRIVACY_FIELDS = new Set([
  // metric_names / metric_range only matter under Secure Aggregation, which this client refuses.
  "metric_names",
  "metric_range",
  "weight_cap",
  "clip_norm",
  "secure_aggregation",
  "group_id",
  "min_group_size",
  "threshold_fraction",
  "clip_range",
  "ring_bits",
]);

interface Options {
  server: string;
  device: string;
  token: string;
  population: string;
  data: string;
  reports: number;
  maxSeconds: number;
  seed: number;
  rest: number;
}

function parseArgs(argv: string[]): Options {
  const get = (name: string): string | undefined => {
    const i = argv.indexOf(`--${name}`);
    return i >= 0 ? argv[i + 1] : undefined;
  };
  const need = (name: string): string => {
    const v = get(name);
    if (v === undefined) throw new Error(`missing --${name}`);
    return v;
  };
  const tokenFile = get("token-file");
  return {
    server: need("server"),
    device: need("device"),
    token: tokenFile !== undefined ? readFileSync(tokenFile, "utf8").trim() : need("token"),
    population: need("population"),
    data: need("data"),
    reports: Number(get("reports") ?? Infinity),
    maxSeconds: Number(get("max-seconds") ?? Infinity),
    seed: Number(get("seed") ?? 1),
    rest: Number(get("rest") ?? 1),
  };
}

function log(event: string, fields: Record<string, unknown> = {}): void {
  process.stdout.write(JSON.stringify({ event, t: Date.now() / 1000, ...fields }) + "\n");
}

let stopping = false;
let wake: (() => void) | null = null;
for (const signal of ["SIGTERM", "SIGINT"] as const) {
  process.on(signal, () => {
    stopping = true;
    wake?.();
  });
}

/** Sleep ``seconds``, cut short by a stop signal. */
function sleep(seconds: number): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, Math.max(0, seconds) * 1000);
    function done(): void {
      clearTimeout(timer);
      wake = null;
      resolve();
    }
    wake = done;
  });
}

class Unsupported extends Error {}

/** The task's privacy plan as this client applies it; anything it cannot apply is refused. */
function clipNormOf(task: TaskDescription): number | null {
  const privacy = task.privacy;
  if (privacy === undefined || privacy === null) return null;
  for (const key of Object.keys(privacy)) {
    if (!PRIVACY_FIELDS.has(key)) throw new Unsupported(`unknown privacy field ${key}`);
  }
  if (privacy["secure_aggregation"] === true) throw new Unsupported("secure aggregation");
  const norm = privacy["clip_norm"];
  return typeof norm === "number" ? norm : null;
}

async function main(): Promise<number> {
  const opts = parseArgs(process.argv.slice(2));
  const examples = loadExamples(opts.data);
  const client = new SelectorClient(opts.server, { id: opts.device, token: opts.token, population: opts.population });
  const random = rng(opts.seed);
  const deadline = Date.now() + opts.maxSeconds * 1000;
  let reported = 0;
  let backoff = 1;
  let nextCheckin = 0;
  log("start", { device: opts.device, examples: examples.n });

  const waitWindow = (w: Window): void => {
    const pick = w.after + random() * (w.within - w.after);
    nextCheckin = Date.now() + pick * 1000;
    log("reconnect", { after: w.after, within: w.within, reason: w.reason, in: pick });
  };

  while (!stopping && reported < opts.reports && Date.now() < deadline) {
    const now = Date.now();
    if (now < nextCheckin) {
      await sleep(Math.min(nextCheckin, deadline) / 1000 - now / 1000);
      continue;
    }
    let answer: Window | Selection;
    try {
      answer = await client.checkin({ charging: true, unmetered: true, idle: true }, examples.n);
      backoff = 1;
    } catch (err) {
      if (err instanceof Busy) {
        const pause = err.retryAfter * (1 + 0.5 * random());
        log("busy", { retry_after: err.retryAfter, in: pause });
        nextCheckin = Date.now() + pause * 1000;
        continue;
      }
      if (err instanceof Unreachable) {
        const pause = backoff * (0.5 + random());
        backoff = Math.min(60, backoff * 2);
        log("unreachable", { error: err.message, in: pause });
        nextCheckin = Date.now() + pause * 1000;
        continue;
      }
      if (err instanceof Refused && err.status === 401) {
        log("refused", { status: 401, detail: err.detail });
        return 3;
      }
      throw err;
    }
    if (answer.kind === "reconnect") {
      waitWindow(answer);
      continue;
    }
    log("selected", { round: answer.roundKey, aggregator: answer.aggregator });
    const outcome = await runTask(client, answer, examples, random, opts.seed);
    if (outcome.kind === "reconnect") waitWindow(outcome);
    else {
      if (outcome.kind === "reported") reported++;
      nextCheckin = Date.now() + opts.rest * 1000 * (0.5 + random());
    }
  }
  log("exit", { reported, stopped: stopping });
  return 0;
}

type Outcome = Window | { kind: "reported" } | { kind: "gave-up"; why: string };

async function runTask(
  client: SelectorClient,
  sel: Selection,
  examples: ReturnType<typeof loadExamples>,
  random: () => number,
  seed: number,
): Promise<Outcome> {
  let task: TaskDescription | null = null;
  let polls = 0;
  while (task === null) {
    if (stopping) {
      await client.abort(sel, "stopped").catch(() => undefined);
      return { kind: "gave-up", why: "stopped" };
    }
    let answer: Awaited<ReturnType<SelectorClient["pollTask"]>>;
    try {
      answer = await client.pollTask(sel, 10);
    } catch (err) {
      if (err instanceof Busy || err instanceof Unreachable) {
        // The selector forgets a device that does not poll for 30 s: retry soon.
        log("poll-failed", { error: (err as Error).message });
        await sleep(1 + random());
        if (++polls > 20) return { kind: "gave-up", why: "poll failures" };
        continue;
      }
      throw err;
    }
    if (answer === "again") continue;
    if (answer === "forgotten") return { kind: "gave-up", why: "selection forgotten" };
    if ("kind" in answer) return answer;
    task = answer;
  }
  let clipNorm: number | null;
  try {
    if (task.task.ref !== BUILTIN || task.task.config["kind"] !== "softmax") {
      throw new Unsupported(`task ${task.task.ref} ${JSON.stringify(task.task.config)}`);
    }
    clipNorm = clipNormOf(task);
  } catch (err) {
    log("abort", { round: sel.roundKey, why: (err as Error).message });
    await client.abort(sel, "unsupported-task").catch(() => undefined);
    return { kind: "gave-up", why: (err as Error).message };
  }
  const classes = Number(task.task.config["classes"]);
  const weights = await client.checkpoint(task.checkpoint_url);
  const result = train(weights, examples, task.plan, classes, rng(seed * 7919 + task.model_version), () => !stopping);
  const update = clipNorm === null ? result.update : clip(result.update, clipNorm);
  const metrics = { train_loss: result.loss, train_accuracy: result.accuracy };
  for (let attempt = 0; ; attempt++) {
    try {
      await client.report(sel, task, update, result.numExamples, metrics);
      log("reported", { round: sel.roundKey, version: task.model_version, examples: result.numExamples, ...metrics });
      return { kind: "reported" };
    } catch (err) {
      if (err instanceof Refused && err.status === 409 && attempt > 0) {
        // Exactly once: a retry answered "already reported" means the first one counted.
        log("reported", { round: sel.roundKey, version: task.model_version, retried: true });
        return { kind: "reported" };
      }
      if ((err instanceof Busy || err instanceof Unreachable) && attempt < 5 && !stopping) {
        const pause = err instanceof Busy ? err.retryAfter : 1 + attempt;
        log("report-retry", { error: err.message, in: pause });
        await sleep(pause * (1 + 0.5 * random()));
        continue;
      }
      log("report-refused", { round: sel.roundKey, error: (err as Error).message });
      return { kind: "gave-up", why: (err as Error).message };
    }
  }
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    log("crash", { error: err instanceof Error ? err.stack ?? err.message : String(err) });
    process.exit(1);
  },
);
