//! The record codec: the one place bincode is used, so it can be replaced without
//! touching the format's framing or the model.

use serde::{de::DeserializeOwned, Serialize};

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<{ 1 << 30 }>()
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding plain data into a Vec cannot fail: there is no I/O and no size limit hit
    // for records far below 1 GiB.
    bincode::serde::encode_to_vec(value, config()).expect("encoding a model record")
}

/// Decodes a whole payload; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (v, used) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| e.to_string())?;
    if used != bytes.len() {
        return Err(format!(
            "{} trailing bytes after the record",
            bytes.len() - used
        ));
    }
    Ok(v)
}
