/**
 * The fedfleet array wire format (docs/device-protocol.md section 3): checkpoints and updates.
 *
 *   message := "FFA1" u32:count record*count
 *   record  := u8:dtype u8:ndim u64:dim*ndim zero-padding(to a 16-byte offset) data
 *
 * All integers little-endian; data in C order. Decoding checks every size a header claims
 * against the bytes present before it allocates, and refuses trailing bytes.
 */

export type DType = "float32" | "float64" | "int64" | "int32" | "uint8";
export type TypedData = Float32Array | Float64Array | BigInt64Array | Int32Array | Uint8Array;

export interface NDArray {
  dtype: DType;
  shape: number[];
  data: TypedData;
}

export class WireError extends Error {}

const MAGIC = [0x46, 0x46, 0x41, 0x31]; // "FFA1"
const MAX_NDIM = 8;
const ALIGN = 16;
const CODE: Record<DType, number> = { float32: 1, float64: 2, int64: 3, int32: 4, uint8: 5 };
const DTYPE_BY_CODE: Record<number, DType> = { 1: "float32", 2: "float64", 3: "int64", 4: "int32", 5: "uint8" };
export const ITEMSIZE: Record<DType, number> = { float32: 4, float64: 8, int64: 8, int32: 4, uint8: 1 };

if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  throw new Error("this client assumes a little-endian host");
}

export function size(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** A typed array of ``dtype`` over a copy of ``bytes`` (little-endian host). */
function typed(dtype: DType, bytes: Uint8Array): TypedData {
  const buf = bytes.slice().buffer;
  switch (dtype) {
    case "float32":
      return new Float32Array(buf);
    case "float64":
      return new Float64Array(buf);
    case "int64":
      return new BigInt64Array(buf);
    case "int32":
      return new Int32Array(buf);
    case "uint8":
      return new Uint8Array(buf);
  }
}

export function makeArray(dtype: DType, shape: number[], values: ArrayLike<number | bigint>): NDArray {
  const n = size(shape);
  if (values.length !== n) throw new WireError(`${values.length} values for shape [${shape}]`);
  let data: TypedData;
  switch (dtype) {
    case "float32":
      data = Float32Array.from(values as ArrayLike<number>, Number);
      break;
    case "float64":
      data = Float64Array.from(values as ArrayLike<number>, Number);
      break;
    case "int64":
      data = BigInt64Array.from(values as ArrayLike<number>, (v) => BigInt(v));
      break;
    case "int32":
      data = Int32Array.from(values as ArrayLike<number>, Number);
      break;
    case "uint8":
      data = Uint8Array.from(values as ArrayLike<number>, Number);
      break;
  }
  return { dtype, shape: [...shape], data };
}

export function encode(arrays: readonly NDArray[]): Uint8Array {
  let total = 8;
  for (const a of arrays) {
    if (a.shape.length > MAX_NDIM) throw new WireError(`more than ${MAX_NDIM} dimensions`);
    if (a.data.length !== size(a.shape)) throw new WireError("data length does not match shape");
    total += 2 + 8 * a.shape.length;
    total += (ALIGN - (total % ALIGN)) % ALIGN;
    total += a.data.byteLength;
  }
  const out = new Uint8Array(total);
  const view = new DataView(out.buffer);
  out.set(MAGIC, 0);
  view.setUint32(4, arrays.length, true);
  let pos = 8;
  for (const a of arrays) {
    view.setUint8(pos, CODE[a.dtype]);
    view.setUint8(pos + 1, a.shape.length);
    pos += 2;
    for (const d of a.shape) {
      view.setBigUint64(pos, BigInt(d), true);
      pos += 8;
    }
    pos += (ALIGN - (pos % ALIGN)) % ALIGN; // zero padding: the buffer starts zeroed
    out.set(new Uint8Array(a.data.buffer, a.data.byteOffset, a.data.byteLength), pos);
    pos += a.data.byteLength;
  }
  return out;
}

export function decode(bytes: Uint8Array): NDArray[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const end = bytes.byteLength;
  if (end < 4 || MAGIC.some((b, i) => bytes[i] !== b)) throw new WireError("not an array message (magic)");
  if (end < 8) throw new WireError("truncated: header ends early");
  const count = view.getUint32(4, true);
  let pos = 8;
  if (count * 2 > end - pos) throw new WireError(`truncated: ${count} arrays cannot fit`);
  const out: NDArray[] = [];
  for (let i = 0; i < count; i++) {
    if (end - pos < 2) throw new WireError(`truncated: array ${i} header`);
    const code = view.getUint8(pos);
    const ndim = view.getUint8(pos + 1);
    pos += 2;
    const dtype = DTYPE_BY_CODE[code];
    if (dtype === undefined) throw new WireError(`array ${i}: unknown dtype code ${code}`);
    if (ndim > MAX_NDIM) throw new WireError(`array ${i}: ${ndim} dimensions`);
    if (end - pos < 8 * ndim) throw new WireError(`truncated: array ${i} shape`);
    const dims: bigint[] = [];
    for (let d = 0; d < ndim; d++) {
      dims.push(view.getBigUint64(pos, true));
      pos += 8;
    }
    const pad = (ALIGN - (pos % ALIGN)) % ALIGN;
    if (end - pos < pad) throw new WireError(`truncated: array ${i} padding`);
    for (let k = 0; k < pad; k++) {
      if (bytes[pos + k] !== 0) throw new WireError(`array ${i}: non-zero padding`);
    }
    pos += pad;
    const elements = dims.reduce((a, b) => a * b, 1n);
    const nbytes = elements * BigInt(ITEMSIZE[dtype]);
    if (nbytes > BigInt(end - pos)) throw new WireError(`truncated: array ${i} claims ${nbytes} bytes`);
    const n = Number(nbytes);
    out.push({ dtype, shape: dims.map(Number), data: typed(dtype, bytes.subarray(pos, pos + n)) });
    pos += n;
  }
  if (pos !== end) throw new WireError(`${end - pos} trailing bytes`);
  return out;
}

export function toHex(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("hex");
}

export function fromHex(hex: string): Uint8Array {
  return new Uint8Array(Buffer.from(hex, "hex"));
}
