//! GGUF (v2 and v3) reader: metadata, tensor infos, alignment, and dequantization of F32, F16,
//! BF16, Q8_0, Q4_0 and Q4_1 tensors. Any other tensor type is reported by name.
//!
//! The file is memory-mapped: quantized weights stay in their packed form in (unified)
//! memory, and callers dequantize one tensor, or one block range, at a time.
//!
//! Every length and offset read from the file is checked against the file's size before it is
//! used, so a truncated or hostile file gives a [`GgufError`], never a panic or a huge
//! allocation.

use half::{bf16, f16};
use std::collections::BTreeMap;
use std::path::Path;

const MAGIC: u32 = 0x4655_4747; // "GGUF" little-endian
const DEFAULT_ALIGNMENT: u64 = 32;

/// Errors reading a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a GGUF file, or a version this reader does not know.
    #[error("not a GGUF v2/v3 file: {0}")]
    NotGguf(String),
    /// The file ends early or a length/offset points outside it.
    #[error("truncated or corrupt GGUF: {0}")]
    Corrupt(String),
    /// A tensor type this reader cannot dequantize.
    #[error(
        "tensor {tensor}: GGML type {type_name} ({type_id}) is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)"
    )]
    UnsupportedType {
        /// The tensor.
        tensor: String,
        /// GGML type id.
        type_id: u32,
        /// GGML type name, if known.
        type_name: &'static str,
    },
    /// No tensor or metadata key of that name.
    #[error("missing {0}")]
    Missing(String),
    /// A metadata value of another type than required.
    #[error("metadata {key}: expected {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// What was required.
        expected: &'static str,
    },
}

/// A GGML tensor type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// Blocks of 32: f16 scale d, 32 x i8; x = d q.
    Q8_0,
    /// Blocks of 32: f16 scale d, 16 bytes of nibbles; x = d (q - 8).
    Q4_0,
    /// Blocks of 32: f16 scale d, f16 minimum m, 16 bytes of nibbles; x = d q + m.
    Q4_1,
    /// Any other type (id kept for the error message).
    Other(u32),
}

impl GgmlType {
    fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            30 => Self::Bf16,
            other => Self::Other(other),
        }
    }

    /// The type's GGML name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
            Self::Q8_0 => "Q8_0",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Other(id) => match id {
                6 => "Q5_0",
                7 => "Q5_1",
                9 => "Q8_1",
                10 => "Q2_K",
                11 => "Q3_K",
                12 => "Q4_K",
                13 => "Q5_K",
                14 => "Q6_K",
                15 => "Q8_K",
                24 => "I8",
                25 => "I16",
                26 => "I32",
                27 => "I64",
                28 => "F64",
                _ => "unknown",
            },
        }
    }

    /// (values per block, bytes per block), or None for unsupported types.
    pub fn block_layout(&self) -> Option<(usize, usize)> {
        match self {
            Self::F32 => Some((1, 4)),
            Self::F16 | Self::Bf16 => Some((1, 2)),
            Self::Q8_0 => Some((32, 34)),
            Self::Q4_0 => Some((32, 18)),
            Self::Q4_1 => Some((32, 20)),
            Self::Other(_) => None,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Unsigned integer (u8, u16, u32, u64).
    UInt(u64),
    /// Signed integer (i8, i16, i32, i64).
    Int(i64),
    /// Float (f32, f64).
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Array of values.
    Array(Vec<Value>),
}

/// One tensor's description.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Name (for example `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, innermost (contiguous) first, as GGUF stores them.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Size of the tensor's data in bytes, if its type is supported.
    pub fn byte_len(&self) -> Option<u64> {
        let (per_block, bytes) = self.ggml_type.block_layout()?;
        Some(self.elements().div_ceil(per_block as u64) * bytes as u64)
    }

    /// Shape in row-major order (outermost first), as torch and safetensors use it.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }
}

enum Data {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

/// A parsed GGUF file.
pub struct Gguf {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata key/value pairs.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors, in file order.
    pub tensors: Vec<TensorInfo>,
    /// Data alignment (`general.alignment`, default 32).
    pub alignment: u64,
    data_offset: usize,
    data: Data,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

/// Bounds-checked little-endian cursor.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                GgufError::Corrupt(format!(
                    "need {n} bytes at offset {}, file has {}",
                    self.pos,
                    self.bytes.len()
                ))
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u8(&mut self) -> Result<u8, GgufError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, GgufError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of items of at least `min_item_bytes` each: must fit in what is left.
    fn count(&mut self, min_item_bytes: usize, what: &str) -> Result<usize, GgufError> {
        let n = self.u64()?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes.max(1) as u64) > left {
            return Err(GgufError::Corrupt(format!(
                "{what}: count {n} exceeds the file"
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.count(1, "string length")?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            GgufError::Corrupt(format!("string at offset {} is not UTF-8", self.pos - n))
        })
    }

    fn value(&mut self, type_id: u32, depth: u32) -> Result<Value, GgufError> {
        Ok(match type_id {
            0 => Value::UInt(self.u8()? as u64),
            1 => Value::Int(self.u8()? as i8 as i64),
            2 => Value::UInt(self.u16()? as u64),
            3 => Value::Int(self.u16()? as i16 as i64),
            4 => Value::UInt(self.u32()? as u64),
            5 => Value::Int(self.u32()? as i32 as i64),
            6 => Value::Float(f32::from_le_bytes(self.array()?) as f64),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::String(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(GgufError::Corrupt("arrays nested too deeply".into()));
                }
                let elem = self.u32()?;
                let n = self.count(1, "array length")?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::UInt(self.u64()?),
            11 => Value::Int(self.u64()? as i64),
            12 => Value::Float(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(GgufError::Corrupt(format!(
                    "unknown metadata value type {other}"
                )));
            }
        })
    }
}

impl Gguf {
    /// Opens and memory-maps a GGUF file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process. Model files are not
        // modified while a trainer runs; if one were truncated underneath, reads could fault,
        // which is the documented caveat of every mmap-based model loader.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(Data::Mapped(map))
    }

    /// Parses a GGUF image held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GgufError> {
        Self::parse(Data::Owned(bytes))
    }

    fn parse(data: Data) -> Result<Self, GgufError> {
        let bytes: &[u8] = match &data {
            Data::Mapped(m) => m,
            Data::Owned(v) => v,
        };
        let mut c = Cursor { bytes, pos: 0 };
        let magic = c
            .u32()
            .map_err(|_| GgufError::NotGguf("shorter than a header".into()))?;
        if magic != MAGIC {
            return Err(GgufError::NotGguf(format!("magic {magic:#010x}")));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::NotGguf(format!("version {version}")));
        }
        let tensor_count = c.u64()?;
        let kv_count = c.u64()?;
        let left = bytes.len() as u64;
        if tensor_count > left / 24 || kv_count > left / 12 {
            return Err(GgufError::Corrupt("counts exceed the file".into()));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = c.string()?;
            let type_id = c.u32()?;
            let value = c.value(type_id, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(tensor_count as usize);
        for _ in 0..tensor_count {
            let name = c.string()?;
            let n_dims = c.u32()?;
            if n_dims > 4 {
                return Err(GgufError::Corrupt(format!(
                    "tensor {name}: {n_dims} dimensions"
                )));
            }
            let dims = (0..n_dims)
                .map(|_| c.u64())
                .collect::<Result<Vec<_>, _>>()?;
            let ggml_type = GgmlType::from_id(c.u32()?);
            let offset = c.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            Some(Value::UInt(a)) if a.is_power_of_two() => *a,
            Some(_) => {
                return Err(GgufError::Corrupt(
                    "general.alignment is not a power of two".into(),
                ));
            }
            None => DEFAULT_ALIGNMENT,
        };
        let data_offset = (c.pos as u64).next_multiple_of(alignment);
        let data_len = (bytes.len() as u64).saturating_sub(data_offset);
        for t in &tensors {
            if let Some(len) = t.byte_len()
                && t.offset.checked_add(len).is_none_or(|end| end > data_len)
            {
                return Err(GgufError::Corrupt(format!(
                    "tensor {} ({len} bytes at {}) lies outside the data section ({data_len} bytes)",
                    t.name, t.offset
                )));
            }
        }
        Ok(Self {
            version,
            metadata,
            tensors,
            alignment,
            data_offset: data_offset as usize,
            data,
        })
    }

    fn bytes(&self) -> &[u8] {
        match &self.data {
            Data::Mapped(m) => m,
            Data::Owned(v) => v,
        }
    }

    /// A tensor's description.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| GgufError::Missing(format!("tensor {name}")))
    }

    /// A tensor's raw (packed) bytes.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<&[u8], GgufError> {
        let len = info.byte_len().ok_or_else(|| unsupported(info))?;
        let start = self.data_offset + info.offset as usize;
        Ok(&self.bytes()[start..start + len as usize])
    }

    /// Dequantizes a whole tensor to f32 (row-major, [`TensorInfo::shape`]).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self.tensor(name)?;
        let mut out = vec![0f32; info.elements() as usize];
        dequantize_into(info.ggml_type, self.tensor_bytes(info)?, &mut out)?;
        Ok(out)
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata
            .get(key)
            .ok_or_else(|| GgufError::Missing(format!("metadata {key}")))
    }

    /// An unsigned integer metadata value.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        match self.get(key)? {
            Value::UInt(v) => Ok(*v),
            Value::Int(v) if *v >= 0 => Ok(*v as u64),
            _ => Err(wrong(key, "an unsigned integer")),
        }
    }

    /// A float metadata value.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        match self.get(key)? {
            Value::Float(v) => Ok(*v),
            _ => Err(wrong(key, "a float")),
        }
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            _ => Err(wrong(key, "a string")),
        }
    }

    /// An array-of-strings metadata value.
    pub fn get_strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    _ => Err(wrong(key, "an array of strings")),
                })
                .collect(),
            _ => Err(wrong(key, "an array of strings")),
        }
    }
}

fn wrong(key: &str, expected: &'static str) -> GgufError {
    GgufError::WrongType {
        key: key.to_owned(),
        expected,
    }
}

fn unsupported(info: &TensorInfo) -> GgufError {
    let type_id = match info.ggml_type {
        GgmlType::Other(id) => id,
        _ => u32::MAX,
    };
    GgufError::UnsupportedType {
        tensor: info.name.clone(),
        type_id,
        type_name: info.ggml_type.name(),
    }
}

/// Dequantizes packed `bytes` of type `ty` into `out` (whose length is the element count).
/// Errors for unsupported types or a byte length that does not match.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    let (per_block, block_bytes) = ty.block_layout().ok_or(GgufError::UnsupportedType {
        tensor: String::new(),
        type_id: match ty {
            GgmlType::Other(id) => id,
            _ => u32::MAX,
        },
        type_name: ty.name(),
    })?;
    if out.len().div_ceil(per_block) * block_bytes != bytes.len()
        || !out.len().is_multiple_of(per_block)
    {
        return Err(GgufError::Corrupt(format!(
            "{} bytes of {} for {} values",
            bytes.len(),
            ty.name(),
            out.len()
        )));
    }
    let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    let blocks = bytes
        .chunks_exact(block_bytes)
        .zip(out.chunks_exact_mut(per_block));
    match ty {
        GgmlType::F32 => {
            for (b, o) in blocks {
                o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (b, o) in blocks {
                o[0] = half(b);
            }
        }
        GgmlType::Bf16 => {
            for (b, o) in blocks {
                o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (b, o) in blocks {
                let d = half(&b[..2]);
                for (x, &q) in o.iter_mut().zip(&b[2..]) {
                    *x = q as i8 as f32 * d;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (b, o) in blocks {
                let d = half(&b[..2]);
                let (lo, hi) = o.split_at_mut(16);
                for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[2..]) {
                    *l = ((q & 0x0f) as i32 - 8) as f32 * d;
                    *h = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (b, o) in blocks {
                let (d, m) = (half(&b[..2]), half(&b[2..4]));
                let (lo, hi) = o.split_at_mut(16);
                for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[4..]) {
                    *l = (q & 0x0f) as f32 * d + m;
                    *h = (q >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Other(_) => unreachable!("rejected above"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Gguf {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/quant_types.gguf");
        Gguf::open(&path).expect("fixture parses")
    }

    #[test]
    fn metadata_of_every_kind() {
        let g = fixture();
        assert_eq!(g.version, 3);
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get_u64("test.u32").unwrap(), 4242);
        assert_eq!(g.get("test.i32").unwrap(), &Value::Int(-7));
        assert_eq!(g.get_f64("test.f32").unwrap(), 0.5);
        assert_eq!(g.get("test.bool").unwrap(), &Value::Bool(true));
        assert_eq!(g.get_str("test.string").unwrap(), "grüße");
        assert_eq!(g.get_strings("test.strings").unwrap(), ["a", "bc", ""]);
        assert_eq!(g.get_u64("test.u64").unwrap(), 1 << 40);
        assert!(matches!(
            g.get_str("test.u32"),
            Err(GgufError::WrongType { .. })
        ));
        assert!(matches!(g.get("nope"), Err(GgufError::Missing(_))));
    }

    #[test]
    fn dequantization_matches_the_gguf_reference_exactly() {
        let g = fixture();
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/quant_types.json"),
        )
        .unwrap();
        let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
        for (name, want_type) in [
            ("f32", GgmlType::F32),
            ("f16", GgmlType::F16),
            ("bf16", GgmlType::Bf16),
            ("q8_0", GgmlType::Q8_0),
            ("q4_0", GgmlType::Q4_0),
            ("q4_1", GgmlType::Q4_1),
        ] {
            let info = g.tensor(name).unwrap();
            assert_eq!(info.ggml_type, want_type);
            assert_eq!(info.shape(), [3, 64]);
            let got = g.dequantize(name).unwrap();
            let want: Vec<f32> = reference[name]["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(got, want, "tensor {name}");
        }
    }

    #[test]
    fn corrupt_and_unsupported_files_are_errors() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/quant_types.gguf");
        let bytes = std::fs::read(&path).unwrap();
        // Every truncation before the end of the last tensor is an error, never a panic.
        let g = fixture();
        let end = g.data_offset
            + g.tensors
                .iter()
                .map(|t| (t.offset + t.byte_len().unwrap()) as usize)
                .max()
                .unwrap();
        for cut in (0..end).step_by(7).chain([end - 1]) {
            assert!(
                Gguf::from_bytes(bytes[..cut].to_vec()).is_err(),
                "cut at {cut}"
            );
        }
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(matches!(Gguf::from_bytes(bad), Err(GgufError::NotGguf(_))));
        // A huge declared count does not allocate: it is rejected.
        let mut huge = bytes.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Gguf::from_bytes(huge), Err(GgufError::Corrupt(_))));
        // An unsupported type is named in the error.
        let mut out = [0f32; 256];
        let err = dequantize_into(GgmlType::Other(12), &[0; 144], &mut out).unwrap_err();
        assert!(err.to_string().contains("Q4_K"), "{err}");
    }
}
