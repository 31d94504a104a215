//! Turns a llama GGUF file into a Hugging Face style safetensors directory (BF16
//! weights, `config.json`, `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`), so mistral.rs can load the same model through its normal
//! (non-GGUF) pipeline, with or without in-situ quantization (ISQ) and UQFF.
//!
//! Everything is done by hand (dequantization, f16/bf16 conversion, safetensors
//! writing; the header through `modelpool_pool::gguf`): no new dependency. The tokenizer is rebuilt the way
//! mistral.rs' own GGUF tokenizer conversion builds it, so both paths tokenize alike.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use modelpool_pool::gguf::{self, Arrays, GgufInfo, TensorEntry};
use serde_json::{json, Map, Value};

const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q4_1: u32 = 3;
const Q8_0: u32 = 8;
const BF16: u32 = 30;
const BOS: &str = "tokenizer.ggml.bos_token_id";
const EOS: &str = "tokenizer.ggml.eos_token_id";
const UNK: &str = "tokenizer.ggml.unknown_token_id";
const PAD: &str = "tokenizer.ggml.padding_token_id";
/// The pre-tokenizer split mistral.rs uses for GGUF `gpt2` (BPE) tokenizers.
const BPE_SPLIT_REGEX: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/// What a conversion wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Tensors in `model.safetensors`.
    pub tensors: usize,
    /// Weights (elements) in all tensors.
    pub parameters: u64,
    /// Size of `model.safetensors`.
    pub safetensors_bytes: u64,
    /// How many source tensors had each GGUF type ("Q4_1" -> 210, ...).
    pub source_types: BTreeMap<String, usize>,
    /// Every file written, in `out_dir`.
    pub files: Vec<PathBuf>,
}

/// The GGUF accessors the converter needs, over the project's one GGUF parser.
trait Meta {
    fn int(&self, key: &str) -> Option<u64>;
    fn need(&self, key: &str) -> anyhow::Result<u64>;
    fn str(&self, key: &str) -> Option<&str>;
    fn f64(&self, key: &str) -> Option<f64>;
}

impl Meta for GgufInfo {
    fn int(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }
    fn need(&self, key: &str) -> anyhow::Result<u64> {
        self.int(key)
            .with_context(|| format!("GGUF metadata `{key}` is missing or not an integer"))
    }
    fn str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }
    fn f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_f64()
    }
}

/// A ggml type's name, for summaries and errors.
pub fn type_name(ggml_type: u32) -> String {
    const NAMES: &str =
        "F32 F16 Q4_0 Q4_1 Q4_2 Q4_3 Q5_0 Q5_1 Q8_0 Q8_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K";
    match (ggml_type, NAMES.split(' ').nth(ggml_type as usize)) {
        (BF16, _) => "BF16".into(),
        (_, Some(name)) => name.into(),
        (t, None) => format!("ggml type {t}"),
    }
}

const SUPPORTED: &str = "only F32, F16, BF16, Q4_0, Q4_1 and Q8_0 can be dequantized";

/// (elements, bytes) per block of the types this module dequantizes.
fn block_layout(ggml_type: u32) -> Option<(usize, usize)> {
    if !matches!(ggml_type, F32 | F16 | BF16 | Q4_0 | Q4_1 | Q8_0) {
        return None;
    }
    let (elements, bytes) = modelpool_pool::gguf::block_layout(ggml_type)?;
    Some((elements as usize, bytes as usize))
}

/// IEEE half precision bits to f32 (exact: every f16 is an f32).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    match exp {
        // Zero and subnormals: mant * 2^-24.
        0 => sign * mant as f32 * f32::from_bits(0x3380_0000),
        0x1f => f32::from_bits((u32::from(h & 0x8000) << 16) | 0x7f80_0000 | (mant << 13)),
        _ => f32::from_bits((u32::from(h & 0x8000) << 16) | ((exp + 112) << 23) | (mant << 13)),
    }
}

/// f32 to bfloat16 bits, rounding to nearest, ties to even; NaN stays a (quiet) NaN.
pub fn f32_to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// Dequantizes `n` elements of ggml type `ggml_type` from `raw`.
pub fn dequantize(ggml_type: u32, raw: &[u8], n: usize) -> anyhow::Result<Vec<f32>> {
    let name = type_name(ggml_type);
    let (block, bytes) = block_layout(ggml_type).with_context(|| format!("{name}: {SUPPORTED}"))?;
    ensure!(
        n.is_multiple_of(block),
        "{n} {name} elements are not whole blocks"
    );
    ensure!(
        raw.len() == n / block * bytes,
        "{n} {name} elements in {} bytes",
        raw.len()
    );
    let f16_at = |b: &[u8], i: usize| f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]));
    let mut out = Vec::with_capacity(n);
    match ggml_type {
        F32 => out.extend(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
        ),
        F16 => out.extend(raw.chunks_exact(2).map(|c| f16_at(c, 0))),
        BF16 => out.extend(
            raw.chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(c[1]) << 24 | u32::from(c[0]) << 16)),
        ),
        Q4_0 | Q4_1 => {
            out.resize(n, 0.0);
            for (b, o) in raw.chunks_exact(bytes).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                if ggml_type == Q4_0 {
                    // Nibbles centred on 8; low nibbles are elements 0..16, high 16..32.
                    for i in 0..16 {
                        o[i] = (i32::from(b[2 + i] & 0x0f) - 8) as f32 * d;
                        o[i + 16] = (i32::from(b[2 + i] >> 4) - 8) as f32 * d;
                    }
                } else {
                    let m = f16_at(b, 2);
                    for i in 0..16 {
                        o[i] = f32::from(b[4 + i] & 0x0f) * d + m;
                        o[i + 16] = f32::from(b[4 + i] >> 4) * d + m;
                    }
                }
            }
        }
        Q8_0 => {
            out.resize(n, 0.0);
            for (b, o) in raw.chunks_exact(bytes).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(b, 0);
                for i in 0..32 {
                    o[i] = f32::from(b[2 + i] as i8) * d;
                }
            }
        }
        _ => unreachable!("block_layout admitted it"),
    }
    Ok(out)
}

/// Undoes llama.cpp's rotary row permutation of a Q or K projection (`rows` x `cols`,
/// row-major, `heads` heads): GGUF row h*hd + 2i + j becomes HF row h*hd + j*hd/2 + i.
pub fn unpermute_rows(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    assert_eq!(data.len(), rows * cols);
    assert!(heads > 0 && rows.is_multiple_of(heads) && (rows / heads).is_multiple_of(2));
    let hd = rows / heads;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = (h * hd + 2 * i + j) * cols;
                let dst = (h * hd + j * (hd / 2) + i) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}

/// The Hugging Face name of a llama GGUF tensor, if it is one this module knows.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.into());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.split_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    (suffix == "weight").then(|| format!("model.layers.{layer}.{hf}.weight"))
}

/// Converts the llama GGUF at `gguf` into a safetensors model directory at `out_dir`
/// (created if missing). Every file is written under a temporary name and renamed into
/// place, so each is complete once this returns.
pub fn gguf_to_safetensors(gguf: &Path, out_dir: &Path) -> anyhow::Result<Summary> {
    let g = gguf::read_header_with(gguf, Arrays::Keep)?;
    let arch = g.str("general.architecture").unwrap_or("?");
    ensure!(arch == "llama", "architecture `{arch}` is not llama");
    if let Some(kind) = g.str("llama.rope.scaling.type").filter(|k| *k != "none") {
        bail!("rope scaling `{kind}` is not supported");
    }
    let heads = g.need("llama.attention.head_count")?;
    let kv_heads = g.int("llama.attention.head_count_kv").unwrap_or(heads);
    let plan = plan(&g, heads as usize, kv_heads as usize)?;
    let tied = !g.tensors.iter().any(|t| t.name == "output.weight");
    // Every file's content is checked before the first byte is written.
    let generation = json!({"bos_token_id": g.int(BOS), "eos_token_id": g.int(EOS)});
    let jsons = [
        ("config.json", config_json(&g, tied)?),
        ("tokenizer.json", tokenizer_json(&g)?),
        ("tokenizer_config.json", tokenizer_config_json(&g)?),
        ("generation_config.json", generation),
    ];
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    for entry in std::fs::read_dir(out_dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        // mistral.rs loads every *.safetensors in the directory: refuse a mix.
        let stray = (name.ends_with(".safetensors") && name != "model.safetensors")
            || name.ends_with(".uqff");
        ensure!(
            !stray,
            "{} holds `{name}`: not a fresh dir",
            out_dir.display()
        );
    }
    let mut source_types = BTreeMap::new();
    for p in &plan {
        *source_types.entry(type_name(p.t.ggml_type)).or_insert(0) += 1;
    }
    let model = out_dir.join("model.safetensors");
    let safetensors_bytes = write_safetensors(gguf, &g, &plan, &model)?;
    let mut files = vec![model];
    for (name, value) in jsons {
        let path = out_dir.join(name);
        write_atomically(&path, |w| {
            serde_json::to_writer_pretty(&mut *w, &value)?;
            Ok(w.write_all(b"\n")?)
        })?;
        files.push(path);
    }
    let (tensors, parameters) = (plan.len(), plan.iter().map(|p| p.n as u64).sum());
    Ok(Summary {
        tensors,
        parameters,
        safetensors_bytes,
        source_types,
        files,
    })
}

/// Writes `path` through `body` into `path.tmp`, then renames it into place.
fn write_atomically(
    path: &Path,
    body: impl FnOnce(&mut BufWriter<File>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let write = || -> anyhow::Result<()> {
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        body(&mut w)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(std::fs::rename(&tmp, path)?)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        e.context(format!("writing {}", path.display()))
    })
}

/// One tensor to convert: its GGUF entry, HF name, elements, stored bytes, and the
/// heads to unpermute by (Q and K projections only).
struct Planned<'a> {
    t: &'a TensorEntry,
    name: String,
    n: usize,
    raw_bytes: usize,
    heads: Option<usize>,
}

/// Checks every tensor (known name, supported type, whole blocks) before anything is
/// written, so an unsupported file fails at once.
fn plan(g: &GgufInfo, heads: usize, kv_heads: usize) -> anyhow::Result<Vec<Planned<'_>>> {
    g.tensors
        .iter()
        .map(|t| {
            let name = hf_name(&t.name)
                .with_context(|| format!("GGUF tensor `{}` has no Hugging Face name", t.name))?;
            ensure!(t.dims.len() <= 4, "`{}` has {} dims", t.name, t.dims.len());
            let n = usize::try_from(t.dims.iter().product::<u64>())?;
            let (block, bytes) = block_layout(t.ggml_type).with_context(|| {
                format!(
                    "tensor `{}` is {}: {SUPPORTED}",
                    t.name,
                    type_name(t.ggml_type)
                )
            })?;
            ensure!(n.is_multiple_of(block), "`{}` is not whole blocks", t.name);
            let q_or_k = [(".attn_q.weight", heads), (".attn_k.weight", kv_heads)];
            let heads = q_or_k.iter().find(|q| t.name.ends_with(q.0)).map(|q| q.1);
            if let Some(heads) = heads {
                let rows = n / t.dims[0].max(1) as usize;
                ensure!(
                    heads > 0 && rows.is_multiple_of(2 * heads),
                    "`{}`: {rows} rows do not split into {heads} rotary heads",
                    t.name
                );
            }
            let raw_bytes = n / block * bytes;
            Ok(Planned {
                t,
                name,
                n,
                raw_bytes,
                heads,
            })
        })
        .collect()
}

/// One tensor read from `src`, dequantized, unpermuted if Q or K, as BF16 bytes.
fn convert(src: &Path, g: &GgufInfo, p: &Planned) -> anyhow::Result<Vec<u8>> {
    let mut raw = vec![0u8; p.raw_bytes];
    let mut f = File::open(src)?;
    f.seek(SeekFrom::Start(g.data_start + p.t.offset))?;
    f.read_exact(&mut raw)?;
    let mut values = dequantize(p.t.ggml_type, &raw, p.n)?;
    if let Some(heads) = p.heads {
        let cols = p.t.dims[0] as usize;
        values = unpermute_rows(&values, p.n / cols, cols, heads);
    }
    let mut out = vec![0u8; 2 * p.n];
    for i in 0..p.n {
        let b = f32_to_bf16(values[i]);
        out[2 * i] = b as u8;
        out[2 * i + 1] = (b >> 8) as u8;
    }
    Ok(out)
}

/// Writes every planned tensor into the safetensors file `path`, converting a few at a
/// time in parallel and writing them in order; returns the file size.
fn write_safetensors(
    src: &Path,
    g: &GgufInfo,
    plan: &[Planned],
    path: &Path,
) -> anyhow::Result<u64> {
    let mut header = Map::new();
    let mut offset = 0u64;
    for p in plan {
        let torch_shape: Vec<u64> = p.t.dims.iter().rev().copied().collect();
        let end = offset + 2 * p.n as u64;
        header.insert(
            p.name.clone(),
            json!({"dtype": "BF16", "shape": torch_shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut header = serde_json::to_string(&header)?.into_bytes();
    // Pad the header with spaces so the data starts 8-byte aligned.
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    write_atomically(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for batch in plan.chunks(threads) {
            std::thread::scope(|s| {
                let jobs: Vec<_> = batch
                    .iter()
                    .map(|p| s.spawn(|| convert(src, g, p)))
                    .collect();
                for (job, p) in jobs.into_iter().zip(batch) {
                    let bytes = job
                        .join()
                        .map_err(|_| anyhow::anyhow!("converting `{}` panicked", p.t.name))?
                        .with_context(|| format!("tensor `{}`", p.t.name))?;
                    w.write_all(&bytes)?;
                }
                anyhow::Ok(())
            })?;
        }
        Ok(())
    })?;
    Ok(8 + header.len() as u64 + offset)
}

/// The token string at metadata id `key`, if the id is present and in range.
fn token_at<'a>(g: &GgufInfo, tokens: &[&'a str], key: &str) -> Option<&'a str> {
    tokens.get(usize::try_from(g.int(key)?).ok()?).copied()
}

fn config_json(g: &GgufInfo, tied: bool) -> anyhow::Result<Value> {
    let vocab = match g.int("llama.vocab_size") {
        Some(v) => v,
        None => g.strings("tokenizer.ggml.tokens")?.len() as u64,
    };
    let heads = g.need("llama.attention.head_count")?;
    let eps = g.f64("llama.attention.layer_norm_rms_epsilon");
    Ok(json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": g.need("llama.embedding_length")?,
        "intermediate_size": g.need("llama.feed_forward_length")?,
        "num_attention_heads": heads,
        "num_key_value_heads": g.int("llama.attention.head_count_kv").unwrap_or(heads),
        "num_hidden_layers": g.need("llama.block_count")?,
        "rms_norm_eps": eps.context("GGUF has no rms_norm epsilon")?,
        "rope_theta": g.f64("llama.rope.freq_base").unwrap_or(1e4),
        "rope_scaling": null,
        "vocab_size": vocab,
        "max_position_embeddings": g.need("llama.context_length")?,
        "tie_word_embeddings": tied,
        "bos_token_id": g.int(BOS),
        "eos_token_id": g.int(EOS),
        "pad_token_id": g.int(PAD),
        "attention_bias": false,
        "mlp_bias": false,
        "torch_dtype": "bfloat16",
        "use_cache": true,
    }))
}

/// A BPE `tokenizer.json` built as mistral.rs builds one from GGUF `gpt2` metadata:
/// byte-level BPE with its GPT-2 style split, every token whose type is not "normal"
/// (and bos, eos, unk) as an added special token.
fn tokenizer_json(g: &GgufInfo) -> anyhow::Result<Value> {
    let model = g.str("tokenizer.ggml.model").unwrap_or("?");
    ensure!(model == "gpt2", "tokenizer `{model}` is not gpt2 (BPE)");
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let merges = g
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| m.split_once(' ').map(|(a, b)| json!([a, b])))
        .collect::<Option<Vec<_>>>()
        .context("a BPE merge without a space")?;
    let types = g
        .get("tokenizer.ggml.token_type")
        .and_then(gguf::Value::as_list);
    let types = types.filter(|t| t.len() == tokens.len());
    // mistral.rs: bos, eos, unk, and every token whose type is not 1 (normal).
    let mut special: Vec<usize> = [BOS, EOS, UNK]
        .iter()
        .filter_map(|k| g.int(k))
        .map(|i| i as usize)
        .collect();
    special.retain(|&i| i < tokens.len());
    if let Some(types) = types {
        special.extend((0..tokens.len()).filter(|&i| types[i].as_i64() != Some(1)));
    }
    special.sort_unstable();
    special.dedup();
    let added: Vec<Value> = special
        .iter()
        .map(|&id| {
            json!({"id": id, "content": tokens[id], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let vocab: Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| ((*t).to_owned(), json!(i)))
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": false, "use_regex": false});
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": BPE_SPLIT_REGEX},
             "behavior": "Isolated", "invert": false},
            byte_level,
        ]},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null,
            "unk_token": token_at(g, &tokens, UNK),
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    }))
}

fn tokenizer_config_json(g: &GgufInfo) -> anyhow::Result<Value> {
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let tok = |key| token_at(g, &tokens, key);
    let add_bos = g
        .get("tokenizer.ggml.add_bos_token")
        .and_then(gguf::Value::as_bool);
    Ok(json!({
        "tokenizer_class": "GPT2Tokenizer",
        "chat_template": g.str("tokenizer.chat_template"),
        "bos_token": tok(BOS),
        "eos_token": tok(EOS),
        "unk_token": tok(UNK),
        "pad_token": tok(PAD),
        "add_bos_token": add_bos.unwrap_or(false),
        "clean_up_tokenization_spaces": false,
        "model_max_length": g.int("llama.context_length"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f16 bits of 0.5, 0.25, -1.0 and 2.0, little-endian.
    const HALF: [u8; 2] = [0x00, 0x38];
    const QUARTER: [u8; 2] = [0x00, 0x34];
    const MINUS_ONE: [u8; 2] = [0x00, 0xbc];
    const TWO: [u8; 2] = [0x00, 0x40];

    #[test]
    fn f16_and_bf16_conversions() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x8000).to_bits(), 0x8000_0000);
        assert!(f16_to_f32(0x7c00).is_infinite() && f16_to_f32(0x7e00).is_nan());
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // Ties go to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(f32::from_bits(u32::from(f32_to_bf16(f32::NAN)) << 16).is_nan());
    }

    #[test]
    fn one_block_of_each_quant_format() {
        // Byte i: low nibble i (element i), high nibble 15 - i (element 16 + i).
        let nibbles: Vec<u8> = (0..16u8).map(|i| i | ((15 - i) << 4)).collect();
        let q4_0 = dequantize(Q4_0, &[&HALF[..], &nibbles].concat(), 32).unwrap();
        let q4_1 = dequantize(Q4_1, &[&QUARTER[..], &MINUS_ONE, &nibbles].concat(), 32).unwrap();
        for i in 0..16 {
            let (lo, hi) = (i as f32, 15.0 - i as f32);
            assert_eq!(
                (q4_0[i], q4_0[16 + i]),
                ((lo - 8.0) * 0.5, (hi - 8.0) * 0.5)
            );
            assert_eq!((q4_1[i], q4_1[16 + i]), (lo * 0.25 - 1.0, hi * 0.25 - 1.0));
        }
        let q8: Vec<u8> = [
            &TWO[..],
            &(0..32).map(|i| (i - 16i8) as u8).collect::<Vec<_>>(),
        ]
        .concat();
        let want: Vec<f32> = (0..32).map(|i| (i - 16) as f32 * 2.0).collect();
        assert_eq!(dequantize(Q8_0, &q8, 32).unwrap(), want);
        assert_eq!(
            dequantize(F16, &[0x00, 0x3c, 0x00, 0xc0], 2).unwrap(),
            [1.0, -2.0]
        );
        assert_eq!(dequantize(F32, &1.5f32.to_le_bytes(), 1).unwrap(), [1.5]);
        assert_eq!(dequantize(BF16, &[0x80, 0x3f], 1).unwrap(), [1.0]);
        assert!(dequantize(12, &[0; 144], 256).is_err(), "Q4_K is refused");
        assert!(
            dequantize(Q8_0, &q8[..33], 32).is_err(),
            "short data is refused"
        );
    }

    #[test]
    fn unpermute_undoes_llama_cpp_rotary_permutation() {
        // GGUF row h*hd + 2i + j holds HF row h*hd + j*hd/2 + i. Two heads of head_dim 4,
        // two columns, each HF row r holding (r, -r): GGUF rows are 0 2 1 3 | 4 6 5 7.
        let rows = |order: &[i32]| order.iter().flat_map(|&r| [r as f32, -r as f32]).collect();
        let gguf: Vec<f32> = rows(&[0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(
            unpermute_rows(&gguf, 8, 2, 2),
            rows(&[0, 1, 2, 3, 4, 5, 6, 7])
        );
        // One head of head_dim 8: GGUF rows are HF rows 0 4 1 5 2 6 3 7.
        let gguf: Vec<f32> = rows(&[0, 4, 1, 5, 2, 6, 3, 7]);
        assert_eq!(
            unpermute_rows(&gguf, 8, 2, 1),
            rows(&[0, 1, 2, 3, 4, 5, 6, 7])
        );
    }

    #[test]
    fn names_map_to_hugging_face() {
        let q = "model.layers.12.self_attn.q_proj.weight";
        assert_eq!(hf_name("blk.12.attn_q.weight").as_deref(), Some(q));
        let norm = "model.layers.0.post_attention_layernorm.weight";
        assert_eq!(hf_name("blk.0.ffn_norm.weight").as_deref(), Some(norm));
        let embed = "model.embed_tokens.weight";
        assert_eq!(hf_name("token_embd.weight").as_deref(), Some(embed));
        assert_eq!(hf_name("blk.0.attn_q.bias"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
