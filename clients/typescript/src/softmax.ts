/**
 * The built-in softmax task (`fedfleet.tasks.builtin:task`, config kind `softmax`), as the
 * protocol page describes it: weights [W (inputs, classes), b (classes,)], logits x @ W + b,
 * minibatch SGD on the mean cross-entropy for the plan's epochs, reshuffled every epoch, with
 * the optional FedProx term. The update is new minus old weights, float32.
 */

import { NDArray, makeArray, size } from "./wire.js";

export interface Plan {
  localEpochs: number;
  batchSize: number;
  learningRate: number;
  proximalMu: number;
}

export interface Examples {
  x: Float64Array; // n * inputs, row-major
  y: Int32Array; // n labels
  n: number;
  inputs: number;
}

export interface TrainResult {
  update: NDArray[];
  numExamples: number;
  loss: number;
  accuracy: number;
}

/** A small seeded PRNG (mulberry32): only the shuffle uses it. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function permutation(n: number, random: () => number): Int32Array {
  const p = Int32Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    const t = p[i]!;
    p[i] = p[j]!;
    p[j] = t;
  }
  return p;
}

export function train(
  weights: NDArray[],
  data: Examples,
  plan: Plan,
  classes: number,
  random: () => number,
  shouldContinue: (epoch: number) => boolean = () => true,
): TrainResult {
  const [w0, b0] = weights;
  if (weights.length !== 2 || w0 === undefined || b0 === undefined) throw new Error("softmax needs [W, b]");
  const inputs = data.inputs;
  if (w0.shape.join() !== `${inputs},${classes}` || b0.shape.join() !== `${classes}`) {
    throw new Error(`checkpoint shapes [${w0.shape}] [${b0.shape}] do not fit ${inputs} inputs, ${classes} classes`);
  }
  const W = Float64Array.from(w0.data as Float32Array);
  const b = Float64Array.from(b0.data as Float32Array);
  const Wg = Float64Array.from(W);
  const bg = Float64Array.from(b);
  const n = data.n;
  const lr = plan.learningRate;
  const mu = plan.proximalMu;
  const z = new Float64Array(plan.batchSize * classes);
  const gW = new Float64Array(W.length);
  const gb = new Float64Array(classes);
  let lossSum = 0;
  let correct = 0;
  for (let epoch = 0; epoch < plan.localEpochs; epoch++) {
    if (!shouldContinue(epoch)) throw new Error(`training stopped before epoch ${epoch + 1}`);
    const last = epoch === plan.localEpochs - 1;
    const order = permutation(n, random);
    for (let start = 0; start < n; start += plan.batchSize) {
      const m = Math.min(plan.batchSize, n - start);
      // forward: logits, softmax; track loss and accuracy in the last epoch
      for (let r = 0; r < m; r++) {
        const row = order[start + r]!;
        const label = data.y[row]!;
        let max = -Infinity;
        let arg = 0;
        for (let c = 0; c < classes; c++) {
          let v = b[c]!;
          for (let k = 0; k < inputs; k++) v += data.x[row * inputs + k]! * W[k * classes + c]!;
          z[r * classes + c] = v;
          if (v > max) {
            max = v;
            arg = c;
          }
        }
        let denom = 0;
        for (let c = 0; c < classes; c++) {
          const e = Math.exp(z[r * classes + c]! - max);
          z[r * classes + c] = e;
          denom += e;
        }
        if (last) {
          lossSum += -Math.log(z[r * classes + label]! / denom);
          if (arg === label) correct++;
        }
        for (let c = 0; c < classes; c++) {
          z[r * classes + c] = (z[r * classes + c]! / denom - (c === label ? 1 : 0)) / m;
        }
      }
      // backward: gradients of the mean cross-entropy, then the SGD step
      gW.fill(0);
      gb.fill(0);
      for (let r = 0; r < m; r++) {
        const row = order[start + r]!;
        for (let c = 0; c < classes; c++) {
          const dz = z[r * classes + c]!;
          gb[c]! += dz;
          for (let k = 0; k < inputs; k++) gW[k * classes + c]! += data.x[row * inputs + k]! * dz;
        }
      }
      for (let i = 0; i < W.length; i++) W[i]! -= lr * (gW[i]! + mu * (W[i]! - Wg[i]!));
      for (let c = 0; c < classes; c++) b[c]! -= lr * (gb[c]! + mu * (b[c]! - bg[c]!));
    }
  }
  const delta = (now: Float64Array, old: Float32Array): number[] =>
    Array.from(now, (v, i) => Math.fround(Math.fround(v) - old[i]!));
  return {
    update: [
      makeArray("float32", [...w0.shape], delta(W, w0.data as Float32Array)),
      makeArray("float32", [...b0.shape], delta(b, b0.data as Float32Array)),
    ],
    numExamples: n,
    loss: lossSum / n,
    accuracy: correct / n,
  };
}

/** DP clipping: scale the update so its L2 norm over all arrays is at most ``clipNorm``. */
export function clip(update: NDArray[], clipNorm: number): NDArray[] {
  const norm = (arrays: NDArray[]): number =>
    Math.sqrt(arrays.reduce((s, a) => s + Array.from(a.data as Float32Array).reduce((t, v) => t + v * v, 0), 0));
  const original = norm(update);
  if (original <= clipNorm) return update;
  let scale = clipNorm / original;
  for (;;) {
    const out = update.map((a) =>
      makeArray("float32", a.shape, Array.from(a.data as Float32Array, (v) => Math.fround(v * scale))),
    );
    if (norm(out) <= clipNorm) return out;
    scale *= 1 - 2 ** -20;
  }
}

export function elements(a: NDArray): number {
  return size(a.shape);
}
