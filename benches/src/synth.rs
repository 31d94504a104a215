//! Synthetic GGUF models for benchmarks: real llama shapes (a 7B, a ~1B, or any),
//! random but valid Q8_0 or Q4_0 weights, and SmolLM2's tokenizer metadata copied
//! byte for byte, so mistral.rs loads them like real models. Their text output is
//! meaningless: they exist to measure memory, load and swap times at real sizes.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use modelpool_engine::sampling::SplitMix64;

/// A llama-architecture shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub ffn: u64,
    pub context: u64,
}

impl Shape {
    /// Llama/Mistral 7B: hidden 4096, 32 layers, 32 heads, 8 KV heads, FFN 14336.
    pub const LLAMA_7B: Shape = Shape {
        hidden: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        ffn: 14336,
        context: 8192,
    };
    /// About 1B parameters (a CI-sized stand-in for a large model).
    pub const LLAMA_1B: Shape = Shape {
        hidden: 2048,
        layers: 16,
        heads: 32,
        kv_heads: 8,
        ffn: 8192,
        context: 8192,
    };

    /// SmolLM2-135M's shape: hidden 576, 30 layers, 9 heads, 3 KV heads, FFN 1536 (a
    /// small model where the real file cannot be had, e.g. on a lent GPU machine).
    pub const SMOL_135M: Shape = Shape {
        hidden: 576,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        ffn: 1536,
        context: 8192,
    };

    /// About the bytes a file of this shape takes with `vocab` tokens: the layers'
    /// matrices in `quant`, the token embeddings in Q8_0 (norms and the header are
    /// small). 4.14 GB for the 7B shape in Q4_0 with SmolLM2's vocabulary, as written.
    pub fn estimated_file_bytes(&self, quant: Quant, vocab: u64) -> u64 {
        let kv_dim = self.kv_heads * (self.hidden / self.heads);
        let per_layer =
            2 * self.hidden * self.hidden + 2 * self.hidden * kv_dim + 3 * self.hidden * self.ffn;
        let layers = self.layers * per_layer / 32 * quant.block_bytes() as u64;
        let embeddings = vocab * self.hidden / 32 * Quant::Q8_0.block_bytes() as u64;
        layers + embeddings
    }
}

/// Weight encoding of the large matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    Q8_0,
    Q4_0,
}

impl Quant {
    fn ggml_type(self) -> u32 {
        match self {
            Quant::Q8_0 => 8,
            Quant::Q4_0 => 2,
        }
    }
    /// Bytes of one block of 32 values.
    fn block_bytes(self) -> usize {
        match self {
            Quant::Q8_0 => 34,
            Quant::Q4_0 => 18,
        }
    }
}

const GGML_F32: u32 = 0;
const ALIGNMENT: u64 = 32;

struct Tensor {
    name: String,
    /// ggml order: innermost (columns) first.
    dims: Vec<u64>,
    ggml_type: u32,
    bytes: u64,
}

fn tensor(name: String, dims: Vec<u64>, quant: Option<Quant>) -> Tensor {
    let elements: u64 = dims.iter().product();
    let (ggml_type, bytes) = match quant {
        None => (GGML_F32, elements * 4),
        Some(q) => (q.ggml_type(), elements / 32 * q.block_bytes() as u64),
    };
    Tensor {
        name,
        dims,
        ggml_type,
        bytes,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_u32_kv(out: &mut Vec<u8>, key: &str, v: u32) {
    put_str(out, key);
    out.extend(4u32.to_le_bytes());
    out.extend(v.to_le_bytes());
}

fn put_f32_kv(out: &mut Vec<u8>, key: &str, v: f32) {
    put_str(out, key);
    out.extend(6u32.to_le_bytes());
    out.extend(v.to_le_bytes());
}

fn put_str_kv(out: &mut Vec<u8>, key: &str, v: &str) {
    put_str(out, key);
    out.extend(8u32.to_le_bytes());
    put_str(out, v);
}

/// The metadata entries of `source` whose key starts with `tokenizer.`, as raw bytes,
/// with their count, and the vocabulary size.
fn tokenizer_metadata(source: &Path) -> anyhow::Result<(Vec<u8>, u64, u64)> {
    let mut f = std::fs::File::open(source).with_context(|| source.display().to_string())?;
    // The header of SmolLM2 (tokenizer included) is a few MB; read enough of it.
    let mut buf = Vec::new();
    Read::by_ref(&mut f).take(64 << 20).read_to_end(&mut buf)?;
    let mut p = Cursor { buf: &buf, at: 0 };
    ensure!(
        p.take(4)? == b"GGUF",
        "{} is not a gguf file",
        source.display()
    );
    let _version = p.u32()?;
    let _tensors = p.u64()?;
    let kv_count = p.u64()?;
    let (mut out, mut count, mut vocab) = (Vec::new(), 0u64, 0u64);
    for _ in 0..kv_count {
        let start = p.at;
        let key_len = p.u64()? as usize;
        let key = std::str::from_utf8(p.take(key_len)?)?.to_owned();
        let ty = p.u32()?;
        if key == "tokenizer.ggml.tokens" {
            let at = p.at;
            let _elem = p.u32()?;
            vocab = p.u64()?;
            p.at = at;
        }
        p.skip_value(ty)?;
        if key.starts_with("tokenizer.") {
            out.extend_from_slice(&buf[start..p.at]);
            count += 1;
        }
    }
    ensure!(
        vocab > 0,
        "{} has no tokenizer.ggml.tokens",
        source.display()
    );
    Ok((out, count, vocab))
}

struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> anyhow::Result<&[u8]> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.buf.len());
        let Some(end) = end else {
            bail!("gguf header ends early")
        };
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn u64(&mut self) -> anyhow::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn skip_value(&mut self, ty: u32) -> anyhow::Result<()> {
        match ty {
            0 | 1 | 7 => self.at += 1,
            2 | 3 => self.at += 2,
            4..=6 => self.at += 4,
            10..=12 => self.at += 8,
            8 => {
                let n = self.u64()? as usize;
                self.take(n)?;
            }
            9 => {
                let elem = self.u32()?;
                let n = self.u64()?;
                for _ in 0..n {
                    self.skip_value(elem)?;
                }
            }
            other => bail!("unknown gguf value type {other}"),
        }
        ensure!(self.at <= self.buf.len(), "gguf header ends early");
        Ok(())
    }
}

/// Vocabulary of SmolLM2, whose tokenizer the synthetic models copy.
const SMOLLM2_VOCAB: u64 = 49_152;

/// Makes the large models that do not exist yet (7B-shaped, Q4_0, random weights),
/// after saying how much disk they take and checking that the file system has it.
pub fn make_missing_7b(large: &[PathBuf], tokenizer_from: &Path) -> anyhow::Result<()> {
    let missing: Vec<&PathBuf> = large.iter().filter(|p| !p.exists()).collect();
    let Some(first) = missing.first() else {
        return Ok(());
    };
    let each = Shape::LLAMA_7B.estimated_file_bytes(Quant::Q4_0, SMOLLM2_VOCAB);
    let need = each * missing.len() as u64;
    let dir = match first.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let free = crate::free_disk_bytes(dir)?;
    eprintln!(
        "making {} 7B-shaped model(s) in {}: about {:.1} GiB of disk ({:.1} GiB free)",
        missing.len(),
        dir.display(),
        need as f64 / 1073741824.0,
        free as f64 / 1073741824.0
    );
    anyhow::ensure!(
        free > need + need / 10,
        "not enough disk for the large models: about {need} bytes needed (and 10% to spare), {free} free in {}",
        dir.display()
    );
    for (i, path) in missing.into_iter().enumerate() {
        write_llama(
            path,
            Shape::LLAMA_7B,
            Quant::Q4_0,
            tokenizer_from,
            42 + i as u64,
        )?;
    }
    Ok(())
}

/// Writes a llama GGUF of `shape` to `out`, its tokenizer taken from `tokenizer_from`.
/// Returns the bytes written.
pub fn write_llama(
    out: &Path,
    shape: Shape,
    quant: Quant,
    tokenizer_from: &Path,
    seed: u64,
) -> anyhow::Result<u64> {
    ensure!(
        shape.hidden.is_multiple_of(shape.heads),
        "hidden must divide by heads"
    );
    ensure!(
        shape.heads.is_multiple_of(shape.kv_heads),
        "heads must divide by kv_heads"
    );
    ensure!(
        shape.hidden.is_multiple_of(32) && shape.ffn.is_multiple_of(32),
        "sizes must be multiples of 32"
    );
    let (tok_kv, tok_count, vocab) = tokenizer_metadata(tokenizer_from)?;
    let head_dim = shape.hidden / shape.heads;
    let kv_dim = shape.kv_heads * head_dim;
    let (h, q) = (shape.hidden, Some(quant));
    // Embeddings stay Q8_0 whatever the layers use (as quantizers do).
    let mut tensors = vec![tensor(
        "token_embd.weight".into(),
        vec![h, vocab],
        Some(Quant::Q8_0),
    )];
    for i in 0..shape.layers {
        let b = |n: &str| format!("blk.{i}.{n}.weight");
        tensors.push(tensor(b("attn_norm"), vec![h], None));
        tensors.push(tensor(b("attn_q"), vec![h, h], q));
        tensors.push(tensor(b("attn_k"), vec![h, kv_dim], q));
        tensors.push(tensor(b("attn_v"), vec![h, kv_dim], q));
        tensors.push(tensor(b("attn_output"), vec![h, h], q));
        tensors.push(tensor(b("ffn_norm"), vec![h], None));
        tensors.push(tensor(b("ffn_gate"), vec![h, shape.ffn], q));
        tensors.push(tensor(b("ffn_up"), vec![h, shape.ffn], q));
        tensors.push(tensor(b("ffn_down"), vec![shape.ffn, h], q));
    }
    tensors.push(tensor("output_norm.weight".into(), vec![h], None));

    let mut head = Vec::new();
    head.extend(b"GGUF");
    head.extend(3u32.to_le_bytes());
    head.extend((tensors.len() as u64).to_le_bytes());
    let own_keys = 11u64;
    head.extend((own_keys + tok_count).to_le_bytes());
    put_str_kv(&mut head, "general.architecture", "llama");
    put_str_kv(
        &mut head,
        "general.name",
        "modelpool synthetic (random weights)",
    );
    put_u32_kv(&mut head, "general.alignment", ALIGNMENT as u32);
    put_u32_kv(&mut head, "llama.context_length", shape.context as u32);
    put_u32_kv(&mut head, "llama.embedding_length", h as u32);
    put_u32_kv(&mut head, "llama.block_count", shape.layers as u32);
    put_u32_kv(&mut head, "llama.feed_forward_length", shape.ffn as u32);
    put_u32_kv(&mut head, "llama.attention.head_count", shape.heads as u32);
    put_u32_kv(
        &mut head,
        "llama.attention.head_count_kv",
        shape.kv_heads as u32,
    );
    put_u32_kv(&mut head, "llama.rope.dimension_count", head_dim as u32);
    put_f32_kv(&mut head, "llama.attention.layer_norm_rms_epsilon", 1e-5);
    head.extend(&tok_kv);
    let mut offset = 0u64;
    for t in &tensors {
        put_str(&mut head, &t.name);
        head.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            head.extend(d.to_le_bytes());
        }
        head.extend(t.ggml_type.to_le_bytes());
        head.extend(offset.to_le_bytes());
        offset += t.bytes.div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    head.resize(
        (head.len() as u64).div_ceil(ALIGNMENT) as usize * ALIGNMENT as usize,
        0,
    );

    let tmp = out.with_extension("gguf.partial");
    let file = std::fs::File::create(&tmp).with_context(|| tmp.display().to_string())?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    w.write_all(&head)?;
    let mut rng = SplitMix64(seed);
    let mut written = head.len() as u64;
    for t in &tensors {
        write_tensor(&mut w, t, &mut rng)?;
        let pad = t.bytes.div_ceil(ALIGNMENT) * ALIGNMENT - t.bytes;
        w.write_all(&vec![0u8; pad as usize])?;
        written += t.bytes + pad;
    }
    w.flush()?;
    w.into_inner()?.sync_all()?;
    std::fs::rename(&tmp, out)?;
    Ok(written)
}

/// Norm weights are 1.0; quantized blocks get a small scale and random codes, so
/// activations stay finite through any number of layers.
fn write_tensor(w: &mut impl Write, t: &Tensor, rng: &mut SplitMix64) -> anyhow::Result<()> {
    if t.ggml_type == GGML_F32 {
        let ones: Vec<u8> = (0..t.bytes / 4)
            .flat_map(|_| 1.0f32.to_le_bytes())
            .collect();
        w.write_all(&ones)?;
        return Ok(());
    }
    let (block, code_bytes) = if t.ggml_type == Quant::Q8_0.ggml_type() {
        (34, 32)
    } else {
        (18, 16)
    };
    // f16 0.0005 (0x1018): |weights| stay below ~0.06 (Q8_0) or ~0.004 (Q4_0).
    let scale = 0x1018u16.to_le_bytes();
    let blocks = (t.bytes / block) as usize;
    let mut chunk = Vec::with_capacity(block as usize * 4096);
    let mut remaining = blocks;
    while remaining > 0 {
        let n = remaining.min(4096);
        chunk.clear();
        for _ in 0..n {
            chunk.extend_from_slice(&scale);
            let mut left = code_bytes;
            while left > 0 {
                let r = rng.next_u64().to_le_bytes();
                let take = left.min(8);
                chunk.extend_from_slice(&r[..take]);
                left -= take;
            }
        }
        w.write_all(&chunk)?;
        remaining -= n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_model_reads_back_with_the_right_shape() {
        let model = real_model();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tiny.gguf");
        let shape = Shape {
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            ffn: 128,
            context: 512,
        };
        let bytes = write_llama(&out, shape, Quant::Q4_0, &model, 7).unwrap();
        assert_eq!(std::fs::metadata(&out).unwrap().len(), bytes);
        let info = modelpool_pool::gguf::read_header(&out).unwrap();
        assert_eq!(info.architecture, "llama");
        let kv = info.kv_shape().unwrap();
        assert_eq!((kv.layers, kv.kv_heads, kv.head_dim), (2, 2, 16));
        assert_eq!(info.tensor_count, 1 + 2 * 9 + 1);
        // The estimate counts the matrices; what it leaves out is the header (SmolLM2's
        // tokenizer, a few MB) and the norms.
        let estimate = shape.estimated_file_bytes(Quant::Q4_0, 49_152);
        let header = info.data_start;
        assert!(
            estimate <= bytes && bytes - estimate <= header + (64 << 10),
            "estimate {estimate}, written {bytes}, header {header}"
        );
    }

    /// The real model, whose tokenizer the synthetic ones borrow.
    fn real_model() -> std::path::PathBuf {
        let p = Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap())
            .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            p.is_file(),
            "{} is missing: run `just fetch-models`",
            p.display()
        );
        p
    }
}
