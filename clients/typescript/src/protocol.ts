/**
 * The device API over HTTP (docs/device-protocol.md section 2): check-in, the task long-poll,
 * the checkpoint download, the report and the abort. Answers are typed outcomes; a 503 is a
 * `Busy` carrying Retry-After, an unreachable selector an `Unreachable`, any other refusal a
 * `Refused` with its status.
 */

import { NDArray, decode, encode } from "./wire.js";

export class Unreachable extends Error {}
export class Busy extends Error {
  constructor(readonly retryAfter: number, detail: string) {
    super(`503: ${detail}`);
  }
}
export class Refused extends Error {
  constructor(readonly status: number, readonly detail: string) {
    super(`${status}: ${detail}`);
  }
}

export interface Window {
  kind: "reconnect";
  after: number; // seconds from now
  within: number;
  reason: string;
}
export interface Selection {
  kind: "selected";
  roundKey: string;
  ticket: string;
  aggregator: string;
}
export interface TaskDescription {
  round_key: string;
  model_version: number;
  checkpoint_url: string;
  task: { ref: string; config: Record<string, unknown> };
  plan: { localEpochs: number; batchSize: number; learningRate: number; proximalMu: number };
  evaluate?: boolean;
  aggregator: string;
  privacy?: Record<string, unknown> | null;
}

const DEFAULT_RETRY_AFTER = 5;

export interface Device {
  id: string;
  token: string;
  population: string;
}

export class SelectorClient {
  constructor(readonly base: string, readonly device: Device, readonly timeoutMs = 30_000) {
    this.base = base.replace(/\/+$/, "");
  }

  private async send(method: string, path: string, init: { headers?: Record<string, string>; body?: Uint8Array | string; timeoutMs?: number } = {}): Promise<Response> {
    try {
      return await fetch(this.base + path, {
        method,
        headers: { "user-agent": "fedfleet-device-ts/0.1", ...(init.headers ?? {}) },
        ...(init.body === undefined ? {} : { body: init.body }),
        signal: AbortSignal.timeout(init.timeoutMs ?? this.timeoutMs),
      });
    } catch (err) {
      throw new Unreachable(`${this.base}${path}: ${(err as Error).message}`);
    }
  }

  private static async fail(r: Response): Promise<Error> {
    let detail = "";
    try {
      const body = (await r.json()) as { detail?: unknown };
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch {
      detail = r.statusText;
    }
    if (r.status === 503) {
      const raw = Number(r.headers.get("retry-after"));
      return new Busy(Number.isFinite(raw) && raw >= 0 ? raw : DEFAULT_RETRY_AFTER, detail);
    }
    return new Refused(r.status, detail);
  }

  private tokenHeaders(): Record<string, string> {
    return { authorization: `Bearer ${this.device.token}`, "x-fedfleet-device": this.device.id };
  }

  private static window(body: Record<string, unknown>): Window {
    const after = Math.max(0, Number(body["reconnect_after_s"] ?? 0));
    const within = Math.max(after, Number(body["reconnect_within_s"] ?? after));
    if (!Number.isFinite(after) || !Number.isFinite(within)) throw new Error(`bad reconnect window ${JSON.stringify(body)}`);
    return { kind: "reconnect", after, within, reason: String(body["reason"] ?? "") };
  }

  async checkin(conditions: { charging: boolean; unmetered: boolean; idle: boolean }, numExamples: number): Promise<Window | Selection> {
    const r = await this.send("POST", "/v1/checkin", {
      headers: { ...this.tokenHeaders(), "content-type": "application/json" },
      body: JSON.stringify({
        device_id: this.device.id,
        population: this.device.population,
        charging: conditions.charging,
        unmetered: conditions.unmetered,
        idle: conditions.idle,
        num_examples: numExamples,
      }),
    });
    if (r.status !== 200) throw await SelectorClient.fail(r);
    const body = (await r.json()) as Record<string, unknown>;
    if (body["outcome"] === "selected") {
      return {
        kind: "selected",
        roundKey: String(body["round_key"]),
        ticket: String(body["ticket"]),
        aggregator: String(body["aggregator"]),
      };
    }
    if (body["outcome"] === "reconnect") return SelectorClient.window(body);
    throw new Error(`unknown check-in outcome ${JSON.stringify(body["outcome"])}`);
  }

  /** One long-poll: the task, a release window (410), "forgotten" (404) or "again" (202). */
  async pollTask(sel: Selection, waitSeconds: number): Promise<TaskDescription | Window | "forgotten" | "again"> {
    const query = `device_id=${encodeURIComponent(this.device.id)}&wait=${waitSeconds}`;
    const r = await this.send("GET", `/v1/tasks/${sel.roundKey}?${query}`, {
      headers: { "x-fedfleet-ticket": sel.ticket },
      timeoutMs: (waitSeconds + 30) * 1000,
    });
    if (r.status === 202) {
      await r.arrayBuffer();
      return "again";
    }
    if (r.status === 200) return (await r.json()) as TaskDescription;
    if (r.status === 410) return SelectorClient.window((await r.json()) as Record<string, unknown>);
    if (r.status === 404) {
      await r.arrayBuffer();
      return "forgotten";
    }
    throw await SelectorClient.fail(r);
  }

  async checkpoint(path: string): Promise<NDArray[]> {
    const r = await this.send("GET", path, { headers: this.tokenHeaders() });
    if (r.status !== 200) throw await SelectorClient.fail(r);
    return decode(new Uint8Array(await r.arrayBuffer()));
  }

  async report(sel: Selection, task: TaskDescription, update: NDArray[], examples: number, metrics: Record<string, number>): Promise<void> {
    const r = await this.send("POST", `/v1/reports/${sel.roundKey}`, {
      headers: {
        "content-type": "application/octet-stream",
        "x-fedfleet-device": this.device.id,
        "x-fedfleet-ticket": sel.ticket,
        "x-fedfleet-examples": String(examples),
        "x-fedfleet-aggregator": task.aggregator,
        "x-fedfleet-metrics": JSON.stringify(metrics),
      },
      body: encode(update),
    });
    if (r.status !== 202 && r.status !== 200) throw await SelectorClient.fail(r);
    await r.arrayBuffer();
  }

  async abort(sel: Selection, reason: string): Promise<void> {
    const r = await this.send("POST", `/v1/aborts/${sel.roundKey}`, {
      headers: { "content-type": "application/json", "x-fedfleet-device": this.device.id, "x-fedfleet-ticket": sel.ticket },
      body: JSON.stringify({ device_id: this.device.id, reason }),
    });
    if (r.status !== 202 && r.status !== 200) throw await SelectorClient.fail(r);
    await r.arrayBuffer();
  }
}
