//! The read position of `pgds tail` and the offset file that keeps it across runs.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use tracing::info;

use super::{TailArgs, TailError};

/// The read position, and the offset file that keeps it across runs.
pub(super) struct Position {
    pub(super) offset: String,
    /// The last `Stream-Cursor`, echoed on live reads (CDN collapsing).
    pub(super) cursor: Option<String>,
    file: Option<PathBuf>,
    /// What the offset file holds, to rewrite it only when the offset moves.
    saved: Option<String>,
}

impl Position {
    pub(super) fn start(args: &TailArgs) -> Result<Self, TailError> {
        let saved = match &args.offset_file {
            Some(path) => read_offset_file(path)?,
            None => None,
        };
        if let (Some(path), Some(offset)) = (&args.offset_file, &saved) {
            info!(file = %path.display(), %offset, "resuming from the offset file");
        }
        Ok(Self {
            offset: saved.clone().unwrap_or_else(|| args.offset.clone()),
            cursor: None,
            file: args.offset_file.clone(),
            saved,
        })
    }

    pub(super) fn advance(
        &mut self,
        offset: String,
        cursor: Option<String>,
    ) -> Result<(), TailError> {
        if cursor.is_some() {
            self.cursor = cursor;
        }
        if let Some(path) = &self.file
            && self.saved.as_deref() != Some(offset.as_str())
        {
            write_offset_file(path, &offset).map_err(|source| TailError::OffsetFile {
                path: path.clone(),
                source,
            })?;
            self.saved = Some(offset.clone());
        }
        self.offset = offset;
        Ok(())
    }
}

/// The offset in `path`; `None` when the file does not exist or is empty.
pub(super) fn read_offset_file(path: &Path) -> Result<Option<String>, TailError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text.trim().to_owned()).filter(|t| !t.is_empty())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TailError::OffsetFile {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Replace `path` with `offset` atomically: a reader (or a crash) sees the old or the new one.
pub(super) fn write_offset_file(path: &Path, offset: &str) -> io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    let temp = path.with_file_name(name);
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(offset.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&temp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_file_is_replaced_whole_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice.offset");
        assert_eq!(read_offset_file(&path).unwrap(), None);
        write_offset_file(&path, "0000_0021").unwrap();
        assert_eq!(
            read_offset_file(&path).unwrap().as_deref(),
            Some("0000_0021")
        );
        write_offset_file(&path, "0000_0042").unwrap();
        assert_eq!(
            read_offset_file(&path).unwrap().as_deref(),
            Some("0000_0042")
        );
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 1, "no temp file is left behind");
        std::fs::write(&path, " \n").unwrap();
        assert_eq!(read_offset_file(&path).unwrap(), None);
    }
}
