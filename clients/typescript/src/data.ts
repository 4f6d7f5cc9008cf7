/**
 * The device's local examples: a JSON file `{"x": [[...], ...], "y": [...]}` or a binary file
 * holding one array message (the wire format) with two arrays, x (n, inputs) floats and
 * y (n,) integer labels.
 */

import { readFileSync } from "node:fs";

import { Examples } from "./softmax.js";
import { decode } from "./wire.js";

export function loadExamples(path: string): Examples {
  const raw = new Uint8Array(readFileSync(path));
  if (raw.length >= 4 && String.fromCharCode(...raw.subarray(0, 4)) === "FFA1") {
    const arrays = decode(raw);
    const [x, y] = arrays;
    if (arrays.length !== 2 || x === undefined || y === undefined) throw new Error(`${path}: expected arrays x and y`);
    if (x.shape.length !== 2 || y.shape.length !== 1 || y.shape[0] !== x.shape[0]) {
      throw new Error(`${path}: x must be (n, inputs) and y (n,)`);
    }
    if (x.dtype !== "float32" && x.dtype !== "float64") throw new Error(`${path}: x must hold floats`);
    if (y.dtype === "float32" || y.dtype === "float64") throw new Error(`${path}: y must hold integers`);
    return {
      x: Float64Array.from(x.data as Float32Array),
      y: Int32Array.from(Array.from(y.data as ArrayLike<number | bigint>, Number)),
      n: x.shape[0]!,
      inputs: x.shape[1]!,
    };
  }
  const doc = JSON.parse(new TextDecoder().decode(raw)) as { x?: number[][]; y?: number[] };
  if (!Array.isArray(doc.x) || !Array.isArray(doc.y) || doc.x.length !== doc.y.length || doc.x.length === 0) {
    throw new Error(`${path}: expected {"x": [[...]], "y": [...]} of equal, non-zero length`);
  }
  const inputs = doc.x[0]!.length;
  if (doc.x.some((row) => row.length !== inputs)) throw new Error(`${path}: rows of x differ in length`);
  return { x: Float64Array.from(doc.x.flat()), y: Int32Array.from(doc.y), n: doc.y.length, inputs };
}
