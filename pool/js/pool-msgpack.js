'use strict';
// The msgpack subset the pool's control frames use (pool/wire/control.py), for the Node SDK.
//
//   encode(value) -> Buffer      decode(bytes) -> value
//
// JS -> msgpack: null/undefined -> nil, booleans, safe integers -> the smallest int format, other
// numbers (and -0) -> float64, BigInt -> int (64-bit at most), strings -> str, Buffer/Uint8Array/
// ArrayBuffer -> bin, arrays -> array, Map and plain objects -> map.
// msgpack -> JS: ints -> Number, or BigInt past Number.MAX_SAFE_INTEGER; float32/64 -> Number;
// str -> string (invalid UTF-8 is an error); bin -> Buffer; maps -> a null-prototype object when every
// key is a string, else a Map. ext types and the never-used byte 0xc1 are errors (MsgpackError).

class MsgpackError extends Error {
  constructor(message) {
    super(message);
    this.name = 'MsgpackError';
  }
}

const utf8 = new TextDecoder('utf-8', { fatal: true });
const MAX_U64 = (1n << 64n) - 1n;
const MIN_I64 = -(1n << 63n);

// ---------------------------------------------------------------- encode

function encode(value) {
  const parts = [];
  encodeInto(parts, value);
  return Buffer.concat(parts);
}

function header(byte, size, write) {
  const b = Buffer.allocUnsafe(1 + size);
  b[0] = byte;
  if (size) write(b);
  return b;
}

function encodeInto(parts, v) {
  if (v === null || v === undefined) parts.push(Buffer.from([0xc0]));
  else if (v === true) parts.push(Buffer.from([0xc3]));
  else if (v === false) parts.push(Buffer.from([0xc2]));
  else if (typeof v === 'number') {
    if (Number.isSafeInteger(v) && !Object.is(v, -0)) parts.push(encodeInt(v));
    else parts.push(header(0xcb, 8, (b) => b.writeDoubleBE(v, 1)));
  } else if (typeof v === 'bigint') {
    if (v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER)) {
      parts.push(encodeInt(Number(v)));
    } else if (v > 0n && v <= MAX_U64) parts.push(header(0xcf, 8, (b) => b.writeBigUInt64BE(v, 1)));
    else if (v < 0n && v >= MIN_I64) parts.push(header(0xd3, 8, (b) => b.writeBigInt64BE(v, 1)));
    else throw new MsgpackError(`integer ${v} does not fit in 64 bits`);
  } else if (typeof v === 'string') {
    const bytes = Buffer.from(v, 'utf8');
    parts.push(lengthHeader(bytes.length, 0xa0, 32, 0xd9, 0xda, 0xdb), bytes);
  } else if (v instanceof Uint8Array || v instanceof ArrayBuffer) {
    const bytes = Buffer.from(v instanceof ArrayBuffer ? new Uint8Array(v) : v);
    parts.push(lengthHeader(bytes.length, -1, 0, 0xc4, 0xc5, 0xc6), bytes);
  } else if (Array.isArray(v)) {
    parts.push(lengthHeader(v.length, 0x90, 16, -1, 0xdc, 0xdd));
    for (const item of v) encodeInto(parts, item);
  } else if (v instanceof Map) {
    parts.push(lengthHeader(v.size, 0x80, 16, -1, 0xde, 0xdf));
    for (const [key, item] of v) {
      encodeInto(parts, key);
      encodeInto(parts, item);
    }
  } else if (typeof v === 'object' && isPlainObject(v)) {
    const keys = Object.keys(v);
    parts.push(lengthHeader(keys.length, 0x80, 16, -1, 0xde, 0xdf));
    for (const key of keys) {
      encodeInto(parts, key);
      encodeInto(parts, v[key]);
    }
  } else {
    throw new MsgpackError(`cannot msgpack-encode a ${v === null ? 'null' : typeof v}` +
      (typeof v === 'object' ? ` (${v.constructor && v.constructor.name})` : ''));
  }
}

function isPlainObject(v) {
  const proto = Object.getPrototypeOf(v);
  return proto === null || proto === Object.prototype;
}

function encodeInt(n) {
  if (n >= 0) {
    if (n < 0x80) return Buffer.from([n]);
    if (n < 0x100) return Buffer.from([0xcc, n]);
    if (n < 0x10000) return header(0xcd, 2, (b) => b.writeUInt16BE(n, 1));
    if (n < 0x100000000) return header(0xce, 4, (b) => b.writeUInt32BE(n, 1));
    return header(0xcf, 8, (b) => b.writeBigUInt64BE(BigInt(n), 1));
  }
  if (n >= -32) return Buffer.from([n & 0xff]);  // negative fixint
  if (n >= -0x80) return header(0xd0, 1, (b) => b.writeInt8(n, 1));
  if (n >= -0x8000) return header(0xd1, 2, (b) => b.writeInt16BE(n, 1));
  if (n >= -0x80000000) return header(0xd2, 4, (b) => b.writeInt32BE(n, 1));
  return header(0xd3, 8, (b) => b.writeBigInt64BE(BigInt(n), 1));
}

// A length header; a type byte of -1 means the format has no such variant.
function lengthHeader(n, fix, fixLimit, t8, t16, t32) {
  if (fix >= 0 && n < fixLimit) return Buffer.from([fix | n]);
  if (t8 >= 0 && n < 0x100) return Buffer.from([t8, n]);
  if (n < 0x10000) return header(t16, 2, (b) => b.writeUInt16BE(n, 1));
  if (n <= 0xffffffff) return header(t32, 4, (b) => b.writeUInt32BE(n, 1));
  throw new MsgpackError(`${n} items or bytes is over msgpack's 32-bit limit`);
}

// ---------------------------------------------------------------- decode

function decode(bytes) {
  const buf = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes);
  const reader = { buf, pos: 0 };
  const value = decodeOne(reader);
  if (reader.pos !== buf.length) {
    throw new MsgpackError(`trailing bytes after the msgpack value (${buf.length - reader.pos})`);
  }
  return value;
}

function take(r, n) {
  if (n > r.buf.length - r.pos) throw new MsgpackError('truncated msgpack value');
  const start = r.pos;
  r.pos += n;
  return start;
}

function int64(r, signed) {
  const at = take(r, 8);
  const big = signed ? r.buf.readBigInt64BE(at) : r.buf.readBigUInt64BE(at);
  const safe = big >= BigInt(Number.MIN_SAFE_INTEGER) && big <= BigInt(Number.MAX_SAFE_INTEGER);
  return safe ? Number(big) : big;
}

function bytesOf(r, n) {
  const at = take(r, n);
  return r.buf.subarray(at, at + n);
}

function str(r, n) {
  try {
    return utf8.decode(bytesOf(r, n));
  } catch (e) {
    if (e instanceof MsgpackError) throw e;
    throw new MsgpackError(`msgpack str is not valid UTF-8: ${e.message}`);
  }
}

function decodeOne(r) {
  const t = r.buf[take(r, 1)];
  if (t <= 0x7f) return t;
  if (t >= 0xe0) return t - 0x100;
  if (t <= 0x8f) return decodeMap(r, t & 0x0f);
  if (t <= 0x9f) return decodeArray(r, t & 0x0f);
  if (t <= 0xbf) return str(r, t & 0x1f);
  switch (t) {
    case 0xc0: return null;
    case 0xc2: return false;
    case 0xc3: return true;
    case 0xc4: return Buffer.from(bytesOf(r, r.buf.readUInt8(take(r, 1))));
    case 0xc5: return Buffer.from(bytesOf(r, r.buf.readUInt16BE(take(r, 2))));
    case 0xc6: return Buffer.from(bytesOf(r, r.buf.readUInt32BE(take(r, 4))));
    case 0xca: return r.buf.readFloatBE(take(r, 4));
    case 0xcb: return r.buf.readDoubleBE(take(r, 8));
    case 0xcc: return r.buf.readUInt8(take(r, 1));
    case 0xcd: return r.buf.readUInt16BE(take(r, 2));
    case 0xce: return r.buf.readUInt32BE(take(r, 4));
    case 0xcf: return int64(r, false);
    case 0xd0: return r.buf.readInt8(take(r, 1));
    case 0xd1: return r.buf.readInt16BE(take(r, 2));
    case 0xd2: return r.buf.readInt32BE(take(r, 4));
    case 0xd3: return int64(r, true);
    case 0xd9: return str(r, r.buf.readUInt8(take(r, 1)));
    case 0xda: return str(r, r.buf.readUInt16BE(take(r, 2)));
    case 0xdb: return str(r, r.buf.readUInt32BE(take(r, 4)));
    case 0xdc: return decodeArray(r, r.buf.readUInt16BE(take(r, 2)));
    case 0xdd: return decodeArray(r, r.buf.readUInt32BE(take(r, 4)));
    case 0xde: return decodeMap(r, r.buf.readUInt16BE(take(r, 2)));
    case 0xdf: return decodeMap(r, r.buf.readUInt32BE(take(r, 4)));
    default:
      throw new MsgpackError(`unsupported msgpack type byte 0x${t.toString(16).padStart(2, '0')}`);
  }
}

function decodeArray(r, n) {
  // Every element takes at least one byte: a count past what is left is a truncated value, and
  // must not allocate first.
  if (n > r.buf.length - r.pos) throw new MsgpackError('truncated msgpack value');
  const out = new Array(n);
  for (let i = 0; i < n; i++) out[i] = decodeOne(r);
  return out;
}

function decodeMap(r, n) {
  if (2 * n > r.buf.length - r.pos) throw new MsgpackError('truncated msgpack value');
  const entries = new Array(n);
  let allStrings = true;
  for (let i = 0; i < n; i++) {
    const key = decodeOne(r);
    entries[i] = [key, decodeOne(r)];
    allStrings = allStrings && typeof key === 'string';
  }
  if (!allStrings) return new Map(entries);
  // A null prototype: a "__proto__" key from the wire is a plain key, not a prototype switch.
  const obj = Object.create(null);
  for (const [key, value] of entries) obj[key] = value;
  return obj;
}

module.exports = { encode, decode, MsgpackError };
