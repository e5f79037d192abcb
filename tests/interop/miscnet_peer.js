#!/usr/bin/env node
// A second, independent implementation of the miscnet wire protocol, version 1, written from
// proto/PROTOCOL.md alone (Node.js 20, standard library only). tests/test_protocol.py runs it against
// the Python nodes in both directions.
//
//   node miscnet_peer.js receive [--max-buffered BYTES] < packets.hex
//       one packet per line as hex ('#' comments and blank lines are skipped); prints JSON: per image
//       the header, the layers received, completeness, the layer digest; drops by reason; the FEEDBACK
//       packets it answered POLLs with.
//   node miscnet_peer.js send FILE.misc --mtu N --image-id I [--no-poll]
//       the image's DATA packets for protection mode none, then the final POLL (token 0xFFFF), as hex,
//       one per line.
//   node miscnet_peer.js inspect FILE.misc...
//       one JSON line per file: whether it is a valid .misc file (and why not), its header, layers, digest.
//
// What it leaves out, as the spec allows: RaptorQ decoding (a FEC block is rebuilt only once all its
// source symbols are there; the code is systematic), and sending in modes fec / arq / hybrid.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const zlib = require('node:zlib');

// ------------------------------------------------------------------ constants (PROTOCOL.md, "Limits")

const HEADER_BYTES = 12;
const PACKET_VERSION = 1;
const MAX_PACKET_BYTES = 65535;
const DATA = 0;
const POLL = 1;
const FEEDBACK = 2;
const KIND_NAMES = ['data', 'poll', 'feedback'];
const FINAL_TOKEN = 0xffff;

const MAX_BLOCKS = 64;
const MAX_SYMBOLS = 4096;
const MAX_BLOCK_BYTES = 4 * 1024 * 1024;
const MAX_SYMBOL_BYTES = 65000;
const MIN_FEC_SYMBOL = 64;
const FEC_ALIGN = 8;
const MAX_IMAGES = 256;
const MAX_BUFFERED = 32 * 1024 * 1024;

const FORMAT_VERSION = 1;
const MAX_SIDE = 16384;
const MAX_PIXELS = 64 * 1024 * 1024;
const MAX_LAYERS = 64;
const MAX_FILE_BYTES = 16 * 1024 * 1024;
const MAGIC = Buffer.from('MI', 'ascii');
const V1_MAGIC = Buffer.from('MISC', 'ascii');
const CONTAINER_VERSION = 2;

const KIND_SEMANTIC = 1;
const KIND_MAP = 2;
const KIND_PIXEL = 3;
const KIND_LABEL = { 1: 'semantic', 2: 'map', 3: 'pixel' };
const PARAMS_OF_KIND = { 1: 'semantic', 2: 'map', 3: 'pixel' };
const CODECS = new Set([1, 2, 3, 16, 17, 32, 33, 34, 35, 36, 37, 40]);

// ------------------------------------------------------------------ CRC-32 (IEEE 802.3, as zlib)

let crcTable = null;
function crc32(buf) {
  if (typeof zlib.crc32 === 'function') return zlib.crc32(buf) >>> 0;
  if (crcTable === null) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let i = 0; i < 8; i++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let c = 0xffffffff;
  for (const byte of buf) c = crcTable[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

// ------------------------------------------------------------------ packets

function encodePacket(kind, imageId, block, symbol, k, payload = Buffer.alloc(0)) {
  const head = Buffer.alloc(HEADER_BYTES);
  head[0] = (PACKET_VERSION << 6) | (kind << 3);
  head.writeUInt16BE(imageId, 1);
  head[3] = block;
  head.writeUInt16BE(symbol, 4);
  head.writeUInt16BE(k, 6);
  head.writeUInt32BE(crc32(Buffer.concat([head.subarray(0, 8), payload])), 8);
  return Buffer.concat([head, payload]);
}

// {packet} or {reason}: the checksum is verified before any other field is looked at.
function decodePacket(buf) {
  if (buf.length < HEADER_BYTES) return { reason: 'short' };
  if (buf.length > MAX_PACKET_BYTES) return { reason: 'oversize' };
  const stored = buf.readUInt32BE(8);
  const computed = crc32(Buffer.concat([buf.subarray(0, 8), buf.subarray(HEADER_BYTES)]));
  if (stored !== computed) return { reason: 'checksum' };
  const first = buf[0];
  if (first >> 6 !== PACKET_VERSION || (first & 7) !== 0) return { reason: 'version' };
  const kind = (first >> 3) & 7;
  if (kind > FEEDBACK) return { reason: 'kind' };
  return {
    packet: {
      kind,
      imageId: buf.readUInt16BE(1),
      block: buf[3],
      symbol: buf.readUInt16BE(4),
      k: buf.readUInt16BE(6),
      payload: buf.subarray(HEADER_BYTES),
    },
  };
}

// ------------------------------------------------------------------ protobuf wire format

class WireError extends Error {}

const TWO64 = 1n << 64n;

// A base-128 varint of at most 10 bytes; its value modulo 2^64, as a BigInt.
function readVarint(buf, pos) {
  let value = 0n;
  for (let i = 0; i < 10; i++) {
    if (pos >= buf.length) throw new WireError('truncated varint');
    const byte = buf[pos++];
    value |= BigInt(byte & 0x7f) << BigInt(7 * i);
    if ((byte & 0x80) === 0) return [value % TWO64, pos];
  }
  throw new WireError('varint longer than 10 bytes');
}

function varint(value) {
  let v = typeof value === 'bigint' ? value : BigInt(value);
  if (v < 0n) v += TWO64; // negative enum values: two's complement, 10 bytes
  const out = [];
  do {
    let byte = Number(v & 0x7fn);
    v >>= 7n;
    if (v > 0n) byte |= 0x80;
    out.push(byte);
  } while (v > 0n);
  return Buffer.from(out);
}

// One field at pos: {num, wt, value (BigInt for varints, Buffer otherwise), end}; groups are skipped whole.
function readField(buf, pos, depth = 0) {
  const start = pos;
  let tag;
  [tag, pos] = readVarint(buf, pos);
  if (tag > 0xffffffffn) throw new WireError('tag over 32 bits');
  const num = Number(tag >> 3n);
  const wt = Number(tag & 7n);
  if (num === 0) throw new WireError('field number 0');
  let value;
  if (wt === 0) {
    [value, pos] = readVarint(buf, pos);
  } else if (wt === 1 || wt === 5) {
    const n = wt === 1 ? 8 : 4;
    if (pos + n > buf.length) throw new WireError('truncated fixed field');
    value = buf.subarray(pos, pos + n);
    pos += n;
  } else if (wt === 2) {
    let n;
    [n, pos] = readVarint(buf, pos);
    if (n > BigInt(buf.length - pos)) throw new WireError('length runs past the message');
    value = buf.subarray(pos, pos + Number(n));
    pos += Number(n);
  } else if (wt === 3) {
    if (depth >= 64) throw new WireError('groups nested too deep');
    for (;;) {
      if (pos >= buf.length) throw new WireError('unterminated group');
      const inner = readField(buf, pos, depth + 1);
      pos = inner.end;
      if (inner.wt === 4) {
        if (inner.num !== num) throw new WireError('mismatched end group');
        break;
      }
    }
    value = null;
  } else if (wt === 4) {
    if (depth === 0) throw new WireError('end group without start');
    value = null;
  } else {
    throw new WireError(`wire type ${wt}`);
  }
  return { num, wt, value, raw: buf.subarray(start, pos), end: pos };
}

// The messages of bitstream.proto and transport.proto: field number -> [name, type, message, oneof].
// Types: u32, enum (int32), bool, bytes, msg, msgs (repeated message), u32s (repeated uint32, packed).
const SCHEMAS = {
  Header: { 1: ['version', 'u32'], 2: ['width', 'u32'], 3: ['height', 'u32'], 4: ['layer_count', 'u32'] },
  SemanticParams: { 1: ['model_version', 'u32'], 2: ['objects', 'u32'] },
  MapParams: { 1: ['grid', 'u32'], 2: ['objects', 'u32'] },
  PixelParams: {
    1: ['width', 'u32'], 2: ['height', 'u32'], 3: ['step', 'u32'], 4: ['plane_shift', 'u32'],
    5: ['plane_bits', 'u32'], 6: ['residual', 'bool'], 7: ['residual_gain', 'u32'], 8: ['quality', 'u32'],
    9: ['colorspace', 'u32'],
  },
  Layer: {
    1: ['kind', 'enum'], 2: ['level', 'u32'], 3: ['codec', 'enum'],
    4: ['semantic', 'msg', 'SemanticParams', 'params'], 5: ['map', 'msg', 'MapParams', 'params'],
    6: ['pixel', 'msg', 'PixelParams', 'params'], 15: ['payload', 'bytes'],
  },
  Bitstream: { 1: ['header', 'msg', 'Header'], 2: ['layers', 'msgs', 'Layer'] },
  BlockStatus: { 1: ['block', 'u32'], 2: ['received', 'u32'], 3: ['decoded', 'bool'], 4: ['missing', 'u32s'] },
  Feedback: { 1: ['token', 'u32'], 2: ['complete', 'bool'], 3: ['blocks', 'msgs', 'BlockStatus'] },
};
const WIRE_TYPE = { u32: 0, enum: 0, bool: 0, bytes: 2, msg: 2, msgs: 2 };

function defaults(type) {
  const obj = { _unknown: [] };
  for (const [name, kind] of Object.values(SCHEMAS[type])) {
    obj[name] = { u32: 0, enum: 0, bool: false, bytes: Buffer.alloc(0), msg: null }[kind];
    if (kind === 'msgs' || kind === 'u32s') obj[name] = [];
  }
  return obj;
}

function scalar(kind, v) {
  if (kind === 'u32') return Number(BigInt.asUintN(32, v));
  if (kind === 'enum') return Number(BigInt.asIntN(32, v));
  return v !== 0n; // bool
}

// Parse a message as protobuf does: last scalar wins, repeated occurrences of a message merge, a new
// oneof member clears the old one, fields of the wrong wire type and unknown fields are kept aside.
function decodeMessage(type, buf, depth = 0) {
  if (depth > 32) throw new WireError('messages nested too deep');
  const schema = SCHEMAS[type];
  const obj = defaults(type);
  const chunks = {}; // name -> Buffers of a singular message field, merged at the end
  const oneofs = {}; // oneof name -> member set last
  let pos = 0;
  while (pos < buf.length) {
    const f = readField(buf, pos);
    pos = f.end;
    const spec = schema[f.num];
    if (spec === undefined) {
      obj._unknown.push(f.raw);
      continue;
    }
    const [name, kind, sub, oneof] = spec;
    if (kind === 'u32s') {
      if (f.wt === 0) obj[name].push(scalar('u32', f.value));
      else if (f.wt === 2) {
        for (let p = 0; p < f.value.length;) {
          let v;
          [v, p] = readVarint(f.value, p);
          obj[name].push(scalar('u32', v));
        }
      } else obj._unknown.push(f.raw);
      continue;
    }
    if (f.wt !== WIRE_TYPE[kind]) {
      obj._unknown.push(f.raw);
      continue;
    }
    if (kind === 'msgs') obj[name].push(decodeMessage(sub, f.value, depth + 1));
    else if (kind === 'msg') {
      if (oneof && oneofs[oneof] !== name) {
        for (const [other, , , group] of Object.values(schema)) if (group === oneof) delete chunks[other];
        oneofs[oneof] = name;
      }
      (chunks[name] = chunks[name] || []).push(f.value);
    } else if (kind === 'bytes') obj[name] = Buffer.from(f.value);
    else obj[name] = scalar(kind, f.value);
  }
  for (const [name, parts] of Object.entries(chunks)) {
    const sub = Object.values(schema).find((s) => s[0] === name)[2];
    obj[name] = decodeMessage(sub, Buffer.concat(parts), depth + 1);
  }
  return obj;
}

function tag(num, wt) {
  return varint((num << 3) | wt);
}

// The canonical encoding: fields in ascending number, default scalars left out, a set message always
// written (even when empty), repeated uint32 packed; unknown fields last, as they came.
function encodeMessage(type, obj) {
  const schema = SCHEMAS[type];
  const parts = [];
  for (const num of Object.keys(schema).map(Number).sort((a, b) => a - b)) {
    const [name, kind, sub] = schema[num];
    const v = obj[name];
    if (kind === 'u32' || kind === 'enum') {
      if (v) parts.push(tag(num, 0), varint(v));
    } else if (kind === 'bool') {
      if (v) parts.push(tag(num, 0), varint(1));
    } else if (kind === 'bytes') {
      if (v && v.length) parts.push(tag(num, 2), varint(v.length), v);
    } else if (kind === 'msg') {
      if (v) {
        const body = encodeMessage(sub, v);
        parts.push(tag(num, 2), varint(body.length), body);
      }
    } else if (kind === 'msgs') {
      for (const item of v) {
        const body = encodeMessage(sub, item);
        parts.push(tag(num, 2), varint(body.length), body);
      }
    } else if (kind === 'u32s' && v.length) {
      const body = Buffer.concat(v.map(varint));
      parts.push(tag(num, 2), varint(body.length), body);
    }
  }
  return Buffer.concat([...parts, ...(obj._unknown || [])]);
}

// ------------------------------------------------------------------ units, layers, digest

function layerName(layer) {
  const kind = KIND_LABEL[layer.kind] || `kind${layer.kind}`;
  return layer.kind === KIND_PIXEL ? `${kind}.${layer.level}` : kind;
}

function streamRank(layer) {
  return [{ 1: 0, 2: 1, 3: 2 }[layer.kind] ?? 9, layer.level];
}

function byStreamOrder(a, b) {
  const [ka, la] = streamRank(a);
  const [kb, lb] = streamRank(b);
  return ka - kb || la - lb;
}

function checkHeader(h) {
  if (h.version !== FORMAT_VERSION) throw new WireError(`format version ${h.version}`);
  if (!(h.width >= 1 && h.width <= MAX_SIDE && h.height >= 1 && h.height <= MAX_SIDE)) {
    throw new WireError(`image size ${h.width}x${h.height}`);
  }
  if (h.width * h.height > MAX_PIXELS) throw new WireError('image over the pixel limit');
  if (h.layer_count > MAX_LAYERS) throw new WireError(`${h.layer_count} layers`);
}

const CODEC_RANGE_OF_KIND = { 1: [1, 15], 2: [16, 31], 3: [32, 63] };
const MAX_FEEDBACK_MISSING = 8192; // 3.2: missing ids one FEEDBACK lists at most
const POLL_FINAL = 1; // 3.2: a POLL whose k is 1 ends its image

function checkLayer(layer) {
  const params = PARAMS_OF_KIND[layer.kind];
  if (params === undefined) throw new WireError(`layer kind ${layer.kind}`);
  if (!CODECS.has(layer.codec)) throw new WireError(`codec ${layer.codec}`);
  const [low, high] = CODEC_RANGE_OF_KIND[layer.kind]; // 5.1: the codec belongs to the layer's kind
  if (layer.codec < low || layer.codec > high) throw new WireError(`codec ${layer.codec} for kind ${layer.kind}`);
  const set = ['semantic', 'map', 'pixel'].filter((n) => layer[n] !== null);
  if (set.length !== 1 || set[0] !== params) throw new WireError(`${layerName(layer)}: wrong parameters`);
  if (layer.kind !== KIND_PIXEL && layer.level !== 0) throw new WireError(`${layerName(layer)}: level`);
}

// SHA-256 over the layers in stream order, each as a 4-byte big-endian length + its canonical encoding.
function layersDigest(layers) {
  const h = crypto.createHash('sha256');
  for (const layer of [...layers].sort(byStreamOrder)) {
    const unit = encodeMessage('Layer', layer);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(unit.length);
    h.update(len);
    h.update(unit);
  }
  return h.digest('hex');
}

// A block's bytes: LEB128 length + unit, repeated; a zero length or the end of the data ends the list.
function readUnits(data) {
  const units = [];
  let pos = 0;
  while (pos < data.length) {
    let n = 0;
    for (let i = 0; ; i++) {
      if (pos >= data.length || i >= 5) throw new WireError('bad unit length');
      const byte = data[pos++];
      n += (byte & 0x7f) * 2 ** (7 * i);
      if ((byte & 0x80) === 0) break;
    }
    if (n === 0) break;
    if (n > MAX_BLOCK_BYTES || pos + n > data.length) throw new WireError('unit runs past the block');
    units.push(data.subarray(pos, pos + n));
    pos += n;
  }
  if (units.length === 0) throw new WireError('empty block');
  const header = decodeMessage('Header', units[0]);
  const layers = units.slice(1).map((u) => decodeMessage('Layer', u));
  checkHeader(header);
  layers.forEach(checkLayer);
  return { header, layers };
}

function writeUnits(header, layers) {
  const parts = [];
  for (const unit of [encodeMessage('Header', header), ...layers.map((l) => encodeMessage('Layer', l))]) {
    parts.push(varint(unit.length), unit);
  }
  return Buffer.concat(parts);
}

// ------------------------------------------------------------------ the .misc container

// Section 10: "MI", version 2, width and height, one record per layer, CRC-32 little-endian.
const PIXEL_OPTIONAL = ['long_side', 'quality', 'residual', 'residual_gain', 'step', 'plane_shift', 'plane_bits',
  'colorspace'];
const FIXED_PARAMS = { 1: ['semantic', ['objects', 'model_version']], 2: ['map', ['grid', 'objects']] };

function readMisc(data) {
  if (data.length > MAX_FILE_BYTES) throw new WireError('file over 16 MiB');
  if (data.subarray(0, 4).equals(V1_MAGIC)) throw new WireError('unsupported container version 1');
  if (data.length < 9) throw new WireError('file truncated');
  if (!data.subarray(0, 2).equals(MAGIC)) throw new WireError('bad magic');
  if (data[2] !== CONTAINER_VERSION) throw new WireError(`unsupported container version ${data[2]}`);
  const end = data.length - 4;
  if (crc32(data.subarray(0, end)) !== data.readUInt32LE(end)) throw new WireError('file checksum mismatch');
  const body = data.subarray(0, end);
  let pos = 3;
  const u32 = (what) => { // a LEB128 of at most 5 bytes whose value fits 32 bits
    let value = 0;
    for (let i = 0; ; i++) {
      if (pos >= end || i >= 5) throw new WireError(`truncated or oversized ${what}`);
      const byte = body[pos++];
      value += (byte & 0x7f) * 2 ** (7 * i);
      if ((byte & 0x80) === 0) break;
    }
    if (value > 0xffffffff) throw new WireError(`${what} over 32 bits`);
    return value;
  };
  const width = u32('width');
  const height = u32('height');
  checkHeader({ version: FORMAT_VERSION, width, height, layer_count: 0 });
  const layers = [];
  let level = 0;
  while (pos < end) {
    if (layers.length >= MAX_LAYERS) throw new WireError(`more than ${MAX_LAYERS} layers`);
    const head = body[pos++];
    const codec = head & 0x3f;
    const kind = Number(Object.keys(CODEC_RANGE_OF_KIND).find((k) => codec >= CODEC_RANGE_OF_KIND[k][0]
      && codec <= CODEC_RANGE_OF_KIND[k][1]));
    if (!CODECS.has(codec) || !kind) throw new WireError(`unknown codec ${codec}`);
    const layer = { ...defaults('Layer'), kind, codec };
    if (kind === KIND_PIXEL) {
      layer.level = level++;
      const p = defaults('PixelParams');
      const side = u32('raster side');
      const short = Math.min(width, height);
      let longSide = Math.max(1, Math.floor((2 * Math.max(width, height) * side + short) / (2 * short)));
      const mask = head & 0x40 ? u32('params mask') : 0;
      if (mask >= 1 << PIXEL_OPTIONAL.length) throw new WireError('undefined mask bits');
      PIXEL_OPTIONAL.forEach((name, bit) => {
        if (!((mask >> bit) & 1)) return;
        if (name === 'residual') p.residual = true;
        else if (name === 'long_side') longSide = u32(name);
        else p[name] = u32(name);
      });
      [p.width, p.height] = width <= height ? [side, longSide] : [longSide, side];
      layer.pixel = p;
    } else {
      if (head & 0x40) throw new WireError('params mask on a non-pixel record');
      const [field, names] = FIXED_PARAMS[kind];
      const params = defaults(field === 'semantic' ? 'SemanticParams' : 'MapParams');
      for (const name of names) params[name] = u32(name);
      layer[field] = params;
    }
    let size;
    if (head & 0x80) size = end - pos;
    else {
      size = u32('payload size');
      if (pos + size >= end) throw new WireError('payload runs past the last record');
    }
    layer.payload = Buffer.from(body.subarray(pos, pos + size));
    pos += size;
    layers.push(layer);
  }
  const names = new Set();
  for (const layer of layers) {
    checkLayer(layer);
    if (names.has(layerName(layer))) throw new WireError(`duplicate ${layerName(layer)}`);
    names.add(layerName(layer));
  }
  return { width, height, layers };
}

// ------------------------------------------------------------------ receiver

class Receiver {
  constructor({ maxBuffered = MAX_BUFFERED } = {}) {
    this.maxBuffered = maxBuffered;
    this.buffered = 0;
    this.images = new Map();
    this.packets = 0;
    this.drops = {};
    this.blocksBad = {};
    this.feedback = [];
  }

  count(table, reason) {
    table[reason] = (table[reason] || 0) + 1;
  }

  // One datagram: verified, then acted on; returns the FEEDBACK packet it answers with, if any.
  receive(buf) {
    this.packets++;
    const { packet, reason } = decodePacket(buf);
    if (reason) return this.count(this.drops, reason);
    if (packet.kind === POLL) {
      const image = this.images.get(packet.imageId);
      // 7.4: a final POLL (k = 1) settles an image still in flight: abandoned unless complete
      if (packet.k === POLL_FINAL && image !== undefined && !image.finished) this.finish(image);
      const reply = this.report(packet);
      this.feedback.push(reply);
      return reply;
    }
    if (packet.kind !== DATA) return this.count(this.drops, 'kind');
    return this.data(packet);
  }

  data(p) {
    const size = p.payload.length;
    if (p.block >= MAX_BLOCKS || p.k < 1 || p.k > MAX_SYMBOLS || size === 0 || size > MAX_SYMBOL_BYTES) {
      return this.count(this.drops, 'fields');
    }
    let image = this.images.get(p.imageId);
    if (image !== undefined && image.finished) return this.count(this.drops, 'redundant');
    if (image === undefined) {
      if (this.inFlight() >= MAX_IMAGES) return this.count(this.drops, 'images');
      image = { blocks: new Map(), header: null, headerBytes: null, layers: new Map(), finished: null };
      this.images.set(p.imageId, image);
    }
    let block = image.blocks.get(p.block);
    if (block === undefined) {
      block = { k: p.k, symbols: new Map(), held: 0, decoded: false, fecSize: null };
      image.blocks.set(p.block, block);
    } else if (block.k !== p.k) {
      return this.count(this.drops, 'fields');
    }
    if (block.decoded) return this.count(this.drops, 'redundant');
    if (block.symbols.has(p.symbol)) return this.count(this.drops, 'duplicate');
    if (p.symbol >= p.k || block.fecSize !== null) {
      const fits = size >= MIN_FEC_SYMBOL && size % FEC_ALIGN === 0 && p.k * size <= MAX_BLOCK_BYTES;
      if (!fits || (block.fecSize !== null && block.fecSize !== size)) {
        return this.count(this.drops, 'symbol-size');
      }
      if (block.fecSize === null) {
        block.fecSize = size;
        for (const [id, sym] of [...block.symbols]) {
          if (sym.length !== size) {
            block.symbols.delete(id);
            block.held -= sym.length;
            this.buffered -= sym.length;
            this.count(this.drops, 'symbol-size');
          }
        }
      }
    }
    if (block.held + size > MAX_BLOCK_BYTES || this.buffered + size > this.maxBuffered) {
      return this.count(this.drops, 'memory');
    }
    block.symbols.set(p.symbol, p.payload);
    block.held += size;
    this.buffered += size;
    for (let s = 0; s < block.k; s++) if (!block.symbols.has(s)) return undefined; // no RaptorQ here
    const bytes = Buffer.concat([...Array(block.k).keys()].map((s) => block.symbols.get(s)));
    block.decoded = true;
    this.buffered -= block.held;
    block.symbols = new Map();
    block.held = 0;
    this.accept(image, bytes);
    if (this.complete(image)) this.finish(image);
    return undefined;
  }

  accept(image, bytes) {
    let units;
    try {
      units = readUnits(bytes);
    } catch (err) {
      if (!(err instanceof WireError)) throw err;
      return this.count(this.blocksBad, 'units');
    }
    const headerBytes = encodeMessage('Header', units.header);
    if (image.header === null) {
      image.header = units.header;
      image.headerBytes = headerBytes;
    } else if (!headerBytes.equals(image.headerBytes)) {
      return this.count(this.blocksBad, 'header-mismatch');
    }
    for (const layer of units.layers) {
      if (!image.layers.has(layerName(layer))) image.layers.set(layerName(layer), layer);
    }
    return undefined;
  }

  complete(image) {
    return image !== undefined && image.header !== null && image.layers.size >= image.header.layer_count;
  }

  // 7.4: a settled image keeps its outcome and layers (for the summary) but no symbols, and stops
  // counting against the images in flight.
  finish(image) {
    image.finished = this.complete(image) ? 'complete' : 'abandoned';
    for (const b of image.blocks.values()) {
      this.buffered -= b.held;
      b.symbols = new Map();
      b.held = 0;
    }
  }

  inFlight() {
    let n = 0;
    for (const image of this.images.values()) if (!image.finished) n++;
    return n;
  }

  report(poll) {
    const image = this.images.get(poll.imageId);
    const fb = { token: poll.symbol, complete: image !== undefined && image.finished === 'complete',
      blocks: [], _unknown: [] };
    if (image !== undefined && !fb.complete && !image.finished) {
      let room = MAX_FEEDBACK_MISSING;
      for (const index of [...image.blocks.keys()].sort((a, b) => a - b)) {
        const b = image.blocks.get(index);
        const missing = [];
        if (!b.decoded) for (let s = 0; s < b.k; s++) if (!b.symbols.has(s)) missing.push(s);
        if (missing.length > room) break; // the rest reads as "nothing received"
        room -= missing.length;
        fb.blocks.push({ block: index, received: b.symbols.size, decoded: b.decoded, missing, _unknown: [] });
      }
    }
    return encodePacket(FEEDBACK, poll.imageId, 0, poll.symbol, 0, encodeMessage('Feedback', fb));
  }

  summary() {
    const images = [];
    for (const id of [...this.images.keys()].sort((a, b) => a - b)) {
      const image = this.images.get(id);
      const layers = [...image.layers.values()].sort(byStreamOrder);
      const h = image.header;
      images.push({
        image_id: id,
        complete: this.complete(image),
        header: h && { version: h.version, width: h.width, height: h.height, layer_count: h.layer_count },
        layers: layers.map((l) => {
          const unit = encodeMessage('Layer', l);
          return {
            name: layerName(l), kind: l.kind, level: l.level, codec: l.codec, payload_bytes: l.payload.length,
            sha256: crypto.createHash('sha256').update(unit).digest('hex'),
          };
        }),
        digest: this.complete(image) ? layersDigest(layers) : null,
        blocks: [...image.blocks.entries()].sort((a, b) => a[0] - b[0])
          .map(([index, b]) => ({ block: index, k: b.k, held: b.symbols.size, decoded: b.decoded })),
      });
    }
    return {
      packets: this.packets, drops: this.drops, blocks_bad: this.blocksBad,
      feedback: this.feedback.map((f) => f.toString('hex')), images,
    };
  }
}

// ------------------------------------------------------------------ sender (mode none)

// Blocks in stream order: every non-pixel layer together first, then one block per pixel level.
function makeBlocks(image) {
  const header = { version: FORMAT_VERSION, width: image.width, height: image.height,
    layer_count: image.layers.length, _unknown: [] };
  const ordered = [...image.layers].sort(byStreamOrder);
  const groups = [ordered.filter((l) => l.kind !== KIND_PIXEL), ...ordered.filter((l) => l.kind === KIND_PIXEL)
    .map((l) => [l])].filter((g) => g.length > 0);
  if (groups.length > MAX_BLOCKS) throw new WireError(`${groups.length} blocks, over ${MAX_BLOCKS}`);
  return groups.map((group) => writeUnits(header, group));
}

function sendNone(image, imageId, mtu, withPoll = true) {
  const out = [];
  makeBlocks(image).forEach((data, index) => {
    const t = Math.min(mtu, data.length);
    const k = Math.ceil(data.length / t);
    if (data.length > MAX_BLOCK_BYTES || k > MAX_SYMBOLS) throw new WireError(`block ${index} too large`);
    for (let s = 0; s < k; s++) out.push(encodePacket(DATA, imageId, index, s, k, data.subarray(s * t, (s + 1) * t)));
  });
  if (withPoll) out.push(encodePacket(POLL, imageId, 0, FINAL_TOKEN, 0));
  return out;
}

// ------------------------------------------------------------------ command line

function option(args, name, fallback) {
  const i = args.indexOf(name);
  if (i < 0) return fallback;
  const value = Number(args[i + 1]);
  if (!Number.isInteger(value)) throw new Error(`${name} needs a whole number`);
  return value;
}

function main(args) {
  const [command, ...rest] = args;
  if (command === 'receive') {
    const rx = new Receiver({ maxBuffered: option(rest, '--max-buffered', MAX_BUFFERED) });
    let hexErrors = 0;
    for (const raw of fs.readFileSync(0, 'utf8').split('\n')) {
      const line = raw.split('#')[0].trim();
      if (line === '') continue;
      if (!/^(?:[0-9a-fA-F]{2})*$/.test(line)) {
        hexErrors++;
        continue;
      }
      rx.receive(Buffer.from(line, 'hex'));
    }
    process.stdout.write(`${JSON.stringify({ ...rx.summary(), hex_errors: hexErrors })}\n`);
    return 0;
  }
  if (command === 'send') {
    const file = rest[0];
    const mtu = option(rest, '--mtu', 1200);
    const imageId = option(rest, '--image-id', 0);
    if (!file || file.startsWith('--')) throw new Error('send needs a .misc file');
    if (mtu < 64 || mtu > 65000) throw new Error('--mtu must be 64..65000');
    if (imageId < 0 || imageId > 0xffff) throw new Error('--image-id must be 0..65535');
    const packets = sendNone(readMisc(fs.readFileSync(file)), imageId, mtu, !rest.includes('--no-poll'));
    process.stdout.write(packets.map((p) => `${p.toString('hex')}\n`).join(''));
    return 0;
  }
  if (command === 'inspect') {
    for (const file of rest) {
      let line;
      try {
        const image = readMisc(fs.readFileSync(file));
        line = { file, ok: true, width: image.width, height: image.height,
          layers: image.layers.map(layerName), digest: layersDigest(image.layers) };
      } catch (err) {
        if (!(err instanceof WireError)) throw err;
        line = { file, ok: false, error: err.message };
      }
      process.stdout.write(`${JSON.stringify(line)}\n`);
    }
    return 0;
  }
  process.stderr.write('usage: miscnet_peer.js receive < packets.hex | send FILE.misc --mtu N --image-id I'
    + ' | inspect FILE.misc...\n');
  return 2;
}

if (require.main === module) {
  try {
    process.exitCode = main(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`miscnet_peer: ${err.message}\n`);
    process.exitCode = 1;
  }
}

module.exports = { encodePacket, decodePacket, decodeMessage, encodeMessage, readUnits, readMisc, layersDigest,
  Receiver, sendNone };
