// numpy's .npy arrays and .npz archives (a zip of .npy members, stored or deflated), read without pickle: the
// bundle's draft head ids (head_ids.npy) and n-gram table (ngram.npz).

const TYPES = {
  "<i8": (buffer, offset, n) => Float64Array.from(new BigInt64Array(buffer, offset, n), Number),
  "<i4": (buffer, offset, n) => new Int32Array(buffer, offset, n),
  "<f2": (buffer, offset, n) => Float32Array.from(new Uint16Array(buffer, offset, n), halfToFloat),
  "<f4": (buffer, offset, n) => new Float32Array(buffer, offset, n),
};

export function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exponent = (h >> 10) & 0x1f;
  const fraction = h & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

// One array: int64 comes back as Float64Array (token ids and n-gram keys stay far below 2**53), float16 as Float32Array.
export function readNpy(bytes, name = "array") {
  const magic = String.fromCharCode(...bytes.subarray(0, 6));
  if (magic !== "\x93NUMPY") throw new Error(`${name} is not a .npy array`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.subarray(start, start + headerLength));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*True/.test(header);
  const shape = (/'shape':\s*\(([^)]*)\)/.exec(header)?.[1] ?? "").split(",").filter((s) => s.trim()).map(Number);
  const read = TYPES[descr];
  if (!read || fortran) throw new Error(`${name}: unsupported array type ${descr}${fortran ? " (Fortran order)" : ""}`);
  const n = shape.reduce((a, b) => a * b, 1);
  const offset = start + headerLength;
  const copy = bytes.slice(offset, offset + n * Number(descr.slice(2)));  // aligned for the typed array
  if (copy.length !== n * Number(descr.slice(2))) throw new Error(`${name} is truncated`);
  return {shape, data: read(copy.buffer, 0, n)};
}

async function inflateRaw(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

// Every member of an .npz archive by name (without ".npy").
export async function readNpz(bytes, name = "archive") {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let end = bytes.length - 22;
  while (end >= 0 && view.getUint32(end, true) !== 0x06054b50) end--;
  if (end < 0) throw new Error(`${name} is not a zip archive`);
  const count = view.getUint16(end + 10, true);
  let entry = view.getUint32(end + 16, true);
  const arrays = {};
  for (let i = 0; i < count; i++) {
    if (view.getUint32(entry, true) !== 0x02014b50) throw new Error(`${name}: corrupt central directory`);
    const method = view.getUint16(entry + 10, true);
    const size = view.getUint32(entry + 20, true);
    const nameLength = view.getUint16(entry + 28, true);
    const extraLength = view.getUint16(entry + 30, true);
    const commentLength = view.getUint16(entry + 32, true);
    const local = view.getUint32(entry + 42, true);
    const member = new TextDecoder().decode(bytes.subarray(entry + 46, entry + 46 + nameLength));
    const dataStart = local + 30 + view.getUint16(local + 26, true) + view.getUint16(local + 28, true);
    const raw = bytes.subarray(dataStart, dataStart + size);
    if (method !== 0 && method !== 8) throw new Error(`${name}: ${member} uses zip method ${method}`);
    const data = method === 8 ? await inflateRaw(raw) : raw;
    arrays[member.replace(/\.npy$/, "")] = readNpy(data, `${name}:${member}`);
    entry += 46 + nameLength + extraLength + commentLength;
  }
  return arrays;
}
