/**
 * Checks this client against the language-neutral vectors (docs/vectors): every valid message
 * encodes to exactly its bytes and decodes to exactly its arrays, every invalid one is refused,
 * and one device round (checkpoint, training, report) gives the documented update.
 *
 *   node dist/test-vectors.js DOCS_VECTORS_DIR
 *
 * Prints one line per failure, then a JSON summary and "N passed, N failed"; exits 1 on failure.
 */

import { readFileSync } from "node:fs";
import { join } from "node:path";

import { train } from "./softmax.js";
import { DType, NDArray, decode, encode, fromHex, makeArray, toHex } from "./wire.js";

interface ArrayDoc {
  dtype: DType;
  shape: number[];
  data: number[];
}

const dir = process.argv[2] ?? "docs/vectors";
const wire = JSON.parse(readFileSync(join(dir, "wire-format.json"), "utf8")) as {
  valid: { name: string; hex: string; arrays: ArrayDoc[] }[];
  invalid: { name: string; hex: string }[];
};
const api = JSON.parse(readFileSync(join(dir, "device-api.json"), "utf8")) as Record<string, any>;

let passed = 0;
const failures: string[] = [];
function check(name: string, ok: boolean, why = ""): void {
  if (ok) passed++;
  else failures.push(`${name}${why ? `: ${why}` : ""}`);
}

const fromDoc = (a: ArrayDoc): NDArray => makeArray(a.dtype, a.shape, a.data);

function sameArrays(got: NDArray[], want: ArrayDoc[]): string {
  if (got.length !== want.length) return `${got.length} arrays, want ${want.length}`;
  for (let i = 0; i < got.length; i++) {
    const g = got[i]!;
    const w = fromDoc(want[i]!);
    if (g.dtype !== w.dtype) return `array ${i} dtype ${g.dtype}, want ${w.dtype}`;
    if (g.shape.join() !== w.shape.join()) return `array ${i} shape [${g.shape}], want [${w.shape}]`;
    const gb = toHex(new Uint8Array(g.data.buffer, g.data.byteOffset, g.data.byteLength));
    const wb = toHex(new Uint8Array(w.data.buffer, w.data.byteOffset, w.data.byteLength));
    if (gb !== wb) return `array ${i} data differs`;
  }
  return "";
}

for (const c of wire.valid) {
  let encoded = "";
  try {
    encoded = toHex(encode(c.arrays.map(fromDoc)));
  } catch (err) {
    encoded = `error ${(err as Error).message}`;
  }
  check(`encode ${c.name}`, encoded === c.hex, encoded === c.hex ? "" : `got ${encoded}`);
  try {
    const why = sameArrays(decode(fromHex(c.hex)), c.arrays);
    check(`decode ${c.name}`, why === "", why);
  } catch (err) {
    check(`decode ${c.name}`, false, (err as Error).message);
  }
}
for (const c of wire.invalid) {
  let refused = false;
  try {
    decode(fromHex(c.hex));
  } catch {
    refused = true;
  }
  check(`refuse ${c.name}`, refused, "decoded");
}

// One device round: the checkpoint decodes, training gives the update, the report encodes it.
const task = api["task"]["configured"]["body"];
const checkpoint = decode(fromHex(api["checkpoint"]["response"]["hex"]));
check("checkpoint", sameArrays(checkpoint, api["checkpoint"]["response"]["arrays"]) === "");
const t = api["training"];
const x = fromDoc(t["x"]);
const y = fromDoc(t["y"]);
const n = y.shape[0]!;
const result = train(
  checkpoint,
  {
    x: Float64Array.from(x.data as Float32Array),
    y: Int32Array.from(Array.from(y.data as BigInt64Array, Number)),
    n,
    inputs: x.shape[1]!,
  },
  task["plan"],
  Number(task["task"]["config"]["classes"]),
  () => 0.5,
);
const want = (t["update"] as ArrayDoc[]).map((a) => a.data);
const worst = Math.max(
  ...result.update.flatMap((a, i) => Array.from(a.data as Float32Array, (v, j) => Math.abs(v - want[i]![j]!))),
);
check("training update", worst <= 1e-5, `max difference ${worst}`);
check("training loss", Math.abs(result.loss - t["train_loss"]) <= 1e-5, `${result.loss}`);
check("report encoding", toHex(encode((t["update"] as ArrayDoc[]).map(fromDoc))) === api["report"]["request"]["hex"]);
check("report examples header", api["report"]["request"]["headers"]["x-fedfleet-examples"] === String(n));

for (const f of failures) console.log(`FAIL ${f}`);
console.log(JSON.stringify({ passed, failed: failures.length, valid: wire.valid.length, invalid: wire.invalid.length }));
console.log(`${passed} passed, ${failures.length} failed`);
process.exit(failures.length ? 1 : 0);
