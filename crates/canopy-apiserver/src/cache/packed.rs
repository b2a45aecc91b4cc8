//! How the watch cache holds an object's JSON: zstd-compressed with a dictionary trained on
//! the resource's own objects.
//!
//! Objects of one kind share most of their bytes (field names, defaults, managed fields), so
//! a dictionary of them compresses a typical 1.6 KB pod to well under 100 bytes, which is what
//! lets the cache hold every object in memory at a small cost per object. Until a resource has
//! enough objects to train on, its objects are kept as they are.

use std::{cell::RefCell, sync::Arc};

use bytes::Bytes;
use zstd::zstd_safe::{CCtx, CDict, DCtx, DDict};

/// Compression level: with a dictionary, higher levels gain little and cost write time.
const LEVEL: i32 = 3;
/// Largest dictionary trained.
const DICTIONARY_BYTES: usize = 32 * 1024;

/// A trained dictionary, prepared for both directions: loading a raw dictionary into a
/// context for every object (hashing all of it each time) cost more than compressing the
/// object itself.
pub struct Dictionary {
    len: usize,
    compress: CDict<'static>,
    decompress: DDict<'static>,
}

impl std::fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dictionary")
            .field("len", &self.len)
            .finish()
    }
}

impl Dictionary {
    /// Trains a dictionary from sample objects; None when zstd finds nothing worth keeping
    /// (too few or too different samples).
    pub fn train(samples: &[Bytes]) -> Option<Arc<Self>> {
        let bytes = zstd::dict::from_samples(samples, DICTIONARY_BYTES).ok()?;
        Some(Arc::new(Self {
            len: bytes.len(),
            compress: CDict::try_create(&bytes, LEVEL)?,
            decompress: DDict::try_create(&bytes)?,
        }))
    }

    /// The dictionary's size.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the dictionary is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

// Contexts are costly to create, so each thread keeps one of each.
thread_local! {
    static COMPRESSOR: RefCell<Option<CCtx<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<DCtx<'static>>> = const { RefCell::new(None) };
}

/// An object's JSON as the cache keeps it.
#[derive(Clone, Debug)]
pub enum Packed {
    /// As is.
    Plain(Bytes),
    /// Compressed with a dictionary.
    Zstd {
        /// Compressed bytes.
        data: Box<[u8]>,
        /// Length once decompressed.
        len: u32,
        /// The dictionary it was compressed with.
        dictionary: Arc<Dictionary>,
    },
}

impl Packed {
    /// Packs JSON, compressed when a dictionary is given and compression pays off.
    pub fn new(json: Bytes, dictionary: Option<&Arc<Dictionary>>) -> Self {
        let Some(dictionary) = dictionary else {
            return Packed::Plain(json);
        };
        let compressed = COMPRESSOR.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.is_none() {
                *cell = CCtx::try_create();
            }
            let context = cell.as_mut()?;
            let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(json.len()));
            context
                .compress_using_cdict(&mut out, &json, &dictionary.compress)
                .ok()?;
            Some(out)
        });
        match compressed {
            Some(data) if data.len() < json.len() => Packed::Zstd {
                data: data.into_boxed_slice(),
                len: json.len() as u32,
                dictionary: dictionary.clone(),
            },
            _ => Packed::Plain(json),
        }
    }

    /// The JSON's length.
    pub fn len(&self) -> usize {
        match self {
            Packed::Plain(b) => b.len(),
            Packed::Zstd { len, .. } => *len as usize,
        }
    }

    /// Whether the JSON is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held in memory.
    pub fn footprint(&self) -> usize {
        match self {
            Packed::Plain(b) => b.len(),
            Packed::Zstd { data, .. } => data.len(),
        }
    }

    /// Whether this is compressed.
    pub fn is_compressed(&self) -> bool {
        matches!(self, Packed::Zstd { .. })
    }

    /// The JSON.
    pub fn json(&self) -> Bytes {
        match self {
            Packed::Plain(b) => b.clone(),
            Packed::Zstd { .. } => {
                let mut out = Vec::with_capacity(self.len());
                self.append_to(&mut out);
                Bytes::from(out)
            }
        }
    }

    /// Appends the JSON to `out`.
    pub fn append_to(&self, out: &mut Vec<u8>) {
        match self {
            Packed::Plain(b) => out.extend_from_slice(b),
            Packed::Zstd {
                data,
                len,
                dictionary,
            } => {
                let start = out.len();
                out.resize(start + *len as usize, 0);
                let written = DECOMPRESSOR.with(|cell| {
                    let mut cell = cell.borrow_mut();
                    if cell.is_none() {
                        *cell = DCtx::try_create();
                    }
                    cell.as_mut()?
                        .decompress_using_ddict(
                            &mut out[start..],
                            &data[..],
                            &dictionary.decompress,
                        )
                        .ok()
                });
                // Data compressed by this process always decompresses; if it ever did not,
                // an empty object is safer than garbage in a response.
                match written {
                    Some(n) if n == *len as usize => {}
                    _ => {
                        out.truncate(start);
                        out.extend_from_slice(b"{}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: usize) -> Bytes {
        Bytes::from(format!(
            r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"pod-{i}","namespace":"default","uid":"{i:08x}-aaaa","labels":{{"app":"web","shard":"{}"}}}},"spec":{{"containers":[{{"name":"app","image":"registry.local/app:1.0","imagePullPolicy":"IfNotPresent","terminationMessagePath":"/dev/termination-log"}}],"dnsPolicy":"ClusterFirst","restartPolicy":"Always","schedulerName":"default-scheduler"}},"status":{{"phase":"Pending","qosClass":"BestEffort"}}}}"#,
            i % 7
        ))
    }

    #[test]
    fn round_trips_and_compresses() {
        let samples: Vec<Bytes> = (0..2000).map(sample).collect();
        let dictionary = Dictionary::train(&samples).expect("trained");
        let original = sample(123_456);
        let packed = Packed::new(original.clone(), Some(&dictionary));
        assert!(packed.is_compressed());
        assert!(
            packed.footprint() * 4 < original.len(),
            "{} vs {}",
            packed.footprint(),
            original.len()
        );
        assert_eq!(packed.json(), original);
        let mut out = b"[".to_vec();
        packed.append_to(&mut out);
        Packed::new(sample(7), None).append_to(&mut out);
        assert_eq!(&out[1..1 + original.len()], &original[..]);
        // Another dictionary on the same thread still decodes both.
        let other = Dictionary::train(&(5000..7000).map(sample).collect::<Vec<_>>()).unwrap();
        let packed2 = Packed::new(sample(9), Some(&other));
        assert_eq!(packed2.json(), sample(9));
        assert_eq!(packed.json(), original);
    }
}
