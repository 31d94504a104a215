//! Reads a GGUF file's header (metadata and tensor table, never the weights) to learn a
//! model's shape and weight bytes, so its footprint can be predicted before any load.
//!
//! The parser trusts nothing: every length is bounded before anything is allocated, so
//! a truncated or hostile file yields an error, not a crash or a huge allocation.
//!
//! It is the project's one GGUF reader: the footprint prediction skips metadata arrays
//! (`Arrays::Skip`), the GGUF-to-safetensors converter keeps them (`Arrays::Keep`) to
//! rebuild the tokenizer, and both get the tensor table with each tensor's offset.

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::Path;

/// Longest string accepted in the header (keys, metadata values, tensor names).
const MAX_STRING_BYTES: u64 = 1 << 20;
/// Most elements accepted in one metadata array (vocabularies are ~10^5).
const MAX_ARRAY_LEN: u64 = 1 << 24;
const MAX_TENSORS: u64 = 1 << 20;
const MAX_KV: u64 = 1 << 16;
const MAX_DIMS: u32 = 8;
/// Most array elements kept in all, with `Arrays::Keep` (vocabularies, merges and token
/// types of the largest real tokenizers come to ~10^6).
const MAX_KEPT_ELEMENTS: u64 = 1 << 22;
/// Data alignment when the header does not say (`general.alignment`).
const DEFAULT_ALIGNMENT: u64 = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GgufError {
    #[error("cannot read {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("not a gguf file (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("unsupported gguf version {0} (supported: 2, 3)")]
    Version(u32),
    #[error("truncated or corrupt gguf header: {0}")]
    Corrupt(String),
    #[error("tensor `{name}` has unsupported type {ggml_type}")]
    TensorType { name: String, ggml_type: u32 },
    #[error("metadata key `{0}` is missing")]
    Missing(String),
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i128),
    /// 32-bit floats are widened through their shortest decimal form, so `1e-5f32`
    /// reads as `1e-5`, not `9.999999747378752e-6`.
    Float(f64),
    Bool(bool),
    Str(String),
    /// An array read with `Arrays::Skip`: only its length is kept.
    Array(u64),
    /// An array read with `Arrays::Keep`.
    List(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(v) => i64::try_from(*v).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(v) => Some(*v),
            Value::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(v) => Some(*v),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(v) => Some(v),
            _ => None,
        }
    }
    /// Elements of an array, kept or skipped.
    pub fn array_len(&self) -> Option<u64> {
        match self {
            Value::Array(n) => Some(*n),
            Value::List(v) => Some(v.len() as u64),
            _ => None,
        }
    }
}

/// Whether metadata arrays are kept (tokenizer rebuilding) or skipped (footprints).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrays {
    Skip,
    Keep,
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    /// ggml order: innermost (contiguous) dimension first.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// From the start of the data section.
    pub offset: u64,
    /// Stored (quantized) bytes.
    pub bytes: u64,
}

/// What the header says about a model.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufInfo {
    pub version: u32,
    pub architecture: String,
    pub metadata: BTreeMap<String, Value>,
    pub tensor_count: u64,
    /// Bytes of all tensors as stored (quantized).
    pub weight_bytes: u64,
    pub tensors: Vec<TensorEntry>,
    /// Absolute file offset of the (aligned) data section.
    pub data_start: u64,
}

impl GgufInfo {
    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A metadata array of strings (kept with `Arrays::Keep`).
    pub fn strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let list = self.get(key).and_then(Value::as_list);
        let list = list.ok_or_else(|| GgufError::Missing(format!("{key} (a kept array)")))?;
        list.iter()
            .map(Value::as_str)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| GgufError::Corrupt(format!("`{key}` holds a non-string")))
    }

    /// An integer metadata value `{architecture}.{suffix}`.
    pub fn arch_u64(&self, suffix: &str) -> Option<u64> {
        self.get(&format!("{}.{suffix}", self.architecture))?
            .as_u64()
    }

    /// Layers, key/value heads and head size, for the KV cache.
    pub fn kv_shape(&self) -> Result<KvShape, GgufError> {
        let need = |k: &str| {
            self.arch_u64(k)
                .ok_or_else(|| GgufError::Missing(format!("{}.{k}", self.architecture)))
        };
        let layers = need("block_count")?;
        let heads = need("attention.head_count")?;
        let kv_heads = self.arch_u64("attention.head_count_kv").unwrap_or(heads);
        let embedding = need("embedding_length")?;
        let head_dim = self
            .arch_u64("attention.key_length")
            .unwrap_or(embedding / heads.max(1));
        Ok(KvShape {
            layers,
            kv_heads,
            head_dim,
            max_context: self.arch_u64("context_length"),
        })
    }
}

/// The dimensions that size a KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub layers: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    /// The context the model was trained for, if the header says.
    pub max_context: Option<u64>,
}

impl KvShape {
    /// Bytes of keys and values for `tokens` tokens at `bytes_per_element`. A shape from
    /// a hostile header saturates at `u64::MAX`, which no budget admits, not overflows.
    pub fn kv_bytes(&self, tokens: u64, bytes_per_element: u64) -> u64 {
        [
            self.layers,
            self.kv_heads,
            self.head_dim,
            tokens,
            bytes_per_element,
        ]
        .into_iter()
        .fold(2, u64::saturating_mul)
    }
}

/// (elements per block, bytes per block) of a ggml tensor type: the one table of ggml
/// block sizes in the project (the dequantizer and the ISQ footprint use it too).
pub fn block_layout(ggml_type: u32) -> Option<(u64, u64)> {
    Some(match ggml_type {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        30 => (1, 2),     // BF16
        _ => return None,
    })
}

/// Reads the header of the GGUF file at `path`, skipping metadata arrays.
pub fn read_header(path: &Path) -> Result<GgufInfo, GgufError> {
    read_header_with(path, Arrays::Skip)
}

/// Reads the header of the GGUF file at `path`, keeping or skipping metadata arrays.
pub fn read_header_with(path: &Path, arrays: Arrays) -> Result<GgufInfo, GgufError> {
    let file = std::fs::File::open(path).map_err(|e| GgufError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    parse_with(BufReader::with_capacity(1 << 16, file), arrays)
}

/// Parses a GGUF header from any reader, skipping metadata arrays.
pub fn parse(reader: impl Read) -> Result<GgufInfo, GgufError> {
    parse_with(reader, Arrays::Skip)
}

/// Parses a GGUF header from any reader.
pub fn parse_with(reader: impl Read, arrays: Arrays) -> Result<GgufInfo, GgufError> {
    let mut r = Reader {
        inner: reader,
        position: 0,
        arrays,
        kept: 0,
    };
    let (version, tensor_count, kv_count) = r.preamble()?;
    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = r.string()?;
        let ty = r.u32()?;
        let value = r.value(ty)?;
        metadata.insert(key, value);
    }
    let mut weight_bytes: u64 = 0;
    // Grown as entries arrive, not reserved from the claimed count.
    let mut tensors = Vec::new();
    for _ in 0..tensor_count {
        let entry = r.tensor_entry()?;
        weight_bytes = weight_bytes.saturating_add(entry.bytes);
        tensors.push(entry);
    }
    let architecture = match metadata.get("general.architecture") {
        Some(Value::Str(a)) => a.clone(),
        _ => return Err(GgufError::Missing("general.architecture".into())),
    };
    let alignment = match metadata.get("general.alignment").and_then(Value::as_u64) {
        Some(a) if a > 0 => a,
        _ => DEFAULT_ALIGNMENT,
    };
    Ok(GgufInfo {
        version,
        architecture,
        metadata,
        tensor_count,
        weight_bytes,
        tensors,
        data_start: r.position.div_ceil(alignment).saturating_mul(alignment),
    })
}

struct Reader<R> {
    inner: R,
    /// Bytes consumed so far: where the data section starts, once the header is read.
    position: u64,
    arrays: Arrays,
    /// Array elements kept so far, against `MAX_KEPT_ELEMENTS`.
    kept: u64,
}

impl<R: Read> Reader<R> {
    /// The fixed start of a header: magic, version, and the tensor and metadata counts
    /// (refused when beyond any real model).
    fn preamble(&mut self) -> Result<(u32, u64, u64), GgufError> {
        let mut magic = [0u8; 4];
        self.exact(&mut magic)?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic(magic));
        }
        let version = self.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let tensor_count = self.u64()?;
        let kv_count = self.u64()?;
        if tensor_count > MAX_TENSORS || kv_count > MAX_KV {
            return Err(GgufError::Corrupt(format!(
                "{tensor_count} tensors and {kv_count} metadata keys is beyond any real model"
            )));
        }
        Ok((version, tensor_count, kv_count))
    }

    /// One entry of the tensor table, with its stored size.
    fn tensor_entry(&mut self) -> Result<TensorEntry, GgufError> {
        let name = self.string()?;
        let n_dims = self.u32()?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::Corrupt(format!(
                "tensor `{name}` has {n_dims} dimensions"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut elements: u64 = 1;
        for _ in 0..n_dims {
            let dim = self.u64()?;
            elements = elements.checked_mul(dim).ok_or_else(|| {
                GgufError::Corrupt(format!("tensor `{name}` is impossibly large"))
            })?;
            dims.push(dim);
        }
        let ggml_type = self.u32()?;
        let offset = self.u64()?;
        let (block, block_bytes) =
            block_layout(ggml_type).ok_or_else(|| GgufError::TensorType {
                name: name.clone(),
                ggml_type,
            })?;
        let bytes = elements.div_ceil(block).saturating_mul(block_bytes);
        Ok(TensorEntry {
            name,
            dims,
            ggml_type,
            offset,
            bytes,
        })
    }

    fn exact(&mut self, buf: &mut [u8]) -> Result<(), GgufError> {
        self.inner
            .read_exact(buf)
            .map_err(|_| GgufError::Corrupt("unexpected end of file".into()))?;
        self.position += buf.len() as u64;
        Ok(())
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.exact(&mut b)?;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn skip(&mut self, n: u64) -> Result<(), GgufError> {
        let copied = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(|e| GgufError::Corrupt(e.to_string()))?;
        if copied != n {
            return Err(GgufError::Corrupt("unexpected end of file".into()));
        }
        self.position += n;
        Ok(())
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let len = self.u64()?;
        if len > MAX_STRING_BYTES {
            return Err(GgufError::Corrupt(format!("a {len}-byte string")));
        }
        let mut buf = vec![0u8; len as usize];
        self.exact(&mut buf)?;
        String::from_utf8(buf).map_err(|_| GgufError::Corrupt("a string is not utf-8".into()))
    }
    fn value(&mut self, ty: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::Int(self.array::<1>()?[0].into()),
            1 => Value::Int((self.array::<1>()?[0] as i8).into()),
            2 => Value::Int(u16::from_le_bytes(self.array()?).into()),
            3 => Value::Int(i16::from_le_bytes(self.array()?).into()),
            4 => Value::Int(self.u32()?.into()),
            5 => Value::Int(i32::from_le_bytes(self.array()?).into()),
            6 => Value::Float(shortest_f64(f32::from_le_bytes(self.array()?))),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                let elem = self.u32()?;
                let len = self.u64()?;
                if len > MAX_ARRAY_LEN {
                    return Err(GgufError::Corrupt(format!("an array of {len} elements")));
                }
                if self.arrays == Arrays::Keep {
                    return self.kept_array(elem, len);
                }
                match fixed_size(elem) {
                    Some(size) => self.skip(len * size)?,
                    None if elem == 8 => {
                        for _ in 0..len {
                            let n = self.u64()?;
                            if n > MAX_STRING_BYTES {
                                return Err(GgufError::Corrupt(format!("a {n}-byte string")));
                            }
                            self.skip(n)?;
                        }
                    }
                    None => {
                        return Err(GgufError::Corrupt(format!(
                            "an array of unsupported element type {elem}"
                        )))
                    }
                }
                Value::Array(len)
            }
            10 => Value::Int(self.u64()?.into()),
            11 => Value::Int(i64::from_le_bytes(self.array()?).into()),
            12 => Value::Float(f64::from_le_bytes(self.array()?)),
            other => return Err(GgufError::Corrupt(format!("metadata value type {other}"))),
        })
    }

    fn kept_array(&mut self, elem: u32, len: u64) -> Result<Value, GgufError> {
        if elem == 9 {
            return Err(GgufError::Corrupt("an array of arrays".into()));
        }
        self.kept = self.kept.saturating_add(len);
        if self.kept > MAX_KEPT_ELEMENTS {
            return Err(GgufError::Corrupt(format!(
                "more than {MAX_KEPT_ELEMENTS} array elements in all"
            )));
        }
        // Grown as elements arrive: a claimed length costs nothing until it is read.
        let mut items = Vec::new();
        for _ in 0..len {
            items.push(self.value(elem)?);
        }
        Ok(Value::List(items))
    }
}

/// An f32 as the f64 of its shortest decimal form (what the file's writer meant).
fn shortest_f64(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(v.into())
}

fn fixed_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid header: llama metadata and one Q4_0 tensor.
    fn header() -> Vec<u8> {
        let mut b = Vec::new();
        let s = |b: &mut Vec<u8>, t: &str| {
            b.extend((t.len() as u64).to_le_bytes());
            b.extend(t.as_bytes());
        };
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(4u64.to_le_bytes());
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "llama");
        for (k, v) in [
            ("llama.block_count", 2u32),
            ("llama.attention.head_count", 4),
        ] {
            s(&mut b, k);
            b.extend(4u32.to_le_bytes());
            b.extend(v.to_le_bytes());
        }
        s(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        s(&mut b, "a");
        s(&mut b, "bc");
        s(&mut b, "blk.0.attn_q.weight");
        b.extend(2u32.to_le_bytes());
        b.extend(64u64.to_le_bytes());
        b.extend(64u64.to_le_bytes());
        b.extend(2u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b
    }

    #[test]
    fn parses_metadata_and_tensor_sizes() {
        let info = parse(&header()[..]).unwrap();
        assert_eq!(info.architecture, "llama");
        assert_eq!(info.arch_u64("block_count"), Some(2));
        assert_eq!(info.metadata["tokenizer.ggml.tokens"], Value::Array(2));
        // 64*64 Q4_0 elements = 128 blocks of 18 bytes.
        assert_eq!(info.weight_bytes, 128 * 18);
        let t = &info.tensors[..];
        assert_eq!(t.len(), 1);
        assert_eq!(
            (t[0].name.as_str(), &t[0].dims[..]),
            ("blk.0.attn_q.weight", &[64, 64][..])
        );
        assert_eq!((t[0].ggml_type, t[0].offset, t[0].bytes), (2, 0, 128 * 18));
        // The data section starts at the header's end, rounded up to 32 bytes.
        let end = header().len() as u64;
        assert_eq!(info.data_start, end.div_ceil(32) * 32);
    }

    #[test]
    fn keeps_arrays_when_asked_and_within_bounds() {
        let info = parse_with(&header()[..], Arrays::Keep).unwrap();
        assert_eq!(info.strings("tokenizer.ggml.tokens").unwrap(), ["a", "bc"]);
        assert_eq!(
            info.get("tokenizer.ggml.tokens").unwrap().array_len(),
            Some(2)
        );
        assert_eq!(info.weight_bytes, 128 * 18);
        // Skipped arrays are not lists.
        let skipped = parse(&header()[..]).unwrap();
        assert!(skipped.strings("tokenizer.ggml.tokens").is_err());
        for len in 0..header().len() {
            assert!(parse_with(&header()[..len], Arrays::Keep).is_err());
        }
        // A claimed length beyond the kept-elements bound is refused before reading.
        let mut h = header();
        let at = h.windows(8).position(|w| w == 2u64.to_le_bytes()).unwrap();
        h[at..at + 8].copy_from_slice(&(MAX_KEPT_ELEMENTS + 1).to_le_bytes());
        assert!(matches!(
            parse_with(&h[..], Arrays::Keep),
            Err(GgufError::Corrupt(m)) if m.contains("in all")
        ));
    }

    #[test]
    fn f32_metadata_reads_as_its_shortest_decimal() {
        assert_eq!(shortest_f64(1e-5), 1e-5);
        assert_eq!(shortest_f64(10000.0), 10000.0);
        assert!(shortest_f64(f32::NAN).is_nan());
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let full = header();
        for len in 0..full.len() {
            assert!(parse(&full[..len]).is_err(), "prefix of {len} bytes parsed");
        }
    }

    #[test]
    fn refuses_wrong_magic_and_huge_lengths() {
        assert_eq!(
            parse(&b"GGML\x03\0\0\0"[..]).unwrap_err(),
            GgufError::BadMagic(*b"GGML")
        );
        let mut h = header();
        // Claim a 2^40-byte key: refused before any allocation.
        h[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(parse(&h[..]), Err(GgufError::Corrupt(_))));
    }

    #[test]
    fn huge_kv_shape_saturates_instead_of_overflowing() {
        // Found by `just fuzz` (gguf_header): llama with 0xa900_0000_0002 layers, in u64.
        let hostile = b"GGUF\x03\0\0\0\0\0\0\0\0\0\0\0\x04\0\0\0\0\0\0\0\
            \x14\0\0\0\0\0\0\0general.architecture\x08\0\0\0\x05\0\0\0\0\0\0\0llama\
            \x11\0\0\0\0\0\0\0llama.block_count\x0a\0\0\0\x02\0\0\0\0\xa9\0\0\
            \x1a\0\0\0\0\0\0\0llama.attention.head_count\x04\0\0\0\x04\0\0\0\
            \x16\0\0\0\0\0\0\0llama.embedding_length\x04\0\0\0\x40\0\0\0";
        let shape = parse(&hostile[..]).unwrap().kv_shape().unwrap();
        assert_eq!(shape.layers, 0xa900_0000_0002);
        assert_eq!(shape.kv_bytes(4096, 2), u64::MAX);
        assert_eq!(shape.kv_bytes(0, 2), 0);
    }

    #[test]
    fn reads_the_real_model_when_present() {
        let p = Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap())
            .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !p.is_file() {
            // The end-to-end suite fails loudly without the model; this unit test only
            // adds a check when it is there.
            return;
        }
        let info = read_header(&p).unwrap();
        assert_eq!(info.architecture, "llama");
        let kv = info.kv_shape().unwrap();
        assert_eq!((kv.layers, kv.kv_heads, kv.head_dim), (30, 3, 64));
        let file = std::fs::metadata(&p).unwrap().len();
        assert!(info.weight_bytes < file && info.weight_bytes > file * 9 / 10);
        let kept = read_header_with(&p, Arrays::Keep).unwrap();
        assert_eq!(kept.strings("tokenizer.ggml.tokens").unwrap().len(), 49152);
        assert_eq!(
            (&kept.tensors, kept.data_start),
            (&info.tensors, info.data_start)
        );
        // The last tensor ends exactly at the end of the file.
        let last = info.tensors.iter().max_by_key(|t| t.offset).unwrap();
        assert_eq!(info.data_start + last.offset + last.bytes, file);
    }
}
