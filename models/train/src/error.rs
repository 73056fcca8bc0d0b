use std::path::PathBuf;

/// Why training or calibration stopped; each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("cannot read or write {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}, line {line}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Config(String),
    #[error("checkpoint {}: {message}", dir.display())]
    Checkpoint { dir: PathBuf, message: String },
    #[error(transparent)]
    Model(#[from] fracture_models::ModelError),
    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl TrainError {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
        move |source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
