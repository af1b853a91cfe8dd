//! [`Stored`]: a node's executor with its model store in front of it.
//!
//! Uploads that name their hash are written into the store (the store is then
//! their spool); others go to the executor as before. Models are mounted from
//! the store's files, and where the executor shares models, one mounted model
//! serves every connection that uses the same weights and config.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use donate_proto::{Executor, JobContext, JobError, Spool, UploadInfo, Weights};

use crate::store::{Hash, ModelStore, Pin, StoreFile};

/// A mounted model, and the store entry it holds pinned (if it came from the store).
pub struct Mounted<M> {
    model: M,
    _pin: Option<Pin>,
}

/// Mounted store models by weights and config, while any connection holds them.
type Shared<M> = HashMap<(Hash, String), Weak<Mounted<M>>>;

/// The host's executor: `E` behind the store, when there is one.
pub(crate) struct Stored<E: Executor> {
    pub(crate) inner: E,
    store: Option<ModelStore>,
    shared: Mutex<Shared<E::Model>>,
}

/// Where a [`Stored`] upload's bytes go.
pub(crate) enum StoredSpool<S> {
    /// The executor's own spool (no store, or no hash to name the file by).
    Inner(S),
    /// Gathered in memory for an executor that does not spool.
    Memory(Vec<u8>),
    /// Into the store.
    File(StoreFile),
    /// The store already holds these bytes: they are only counted (the node
    /// checks their hash), never written twice.
    Known { hash: Hash, written: u64 },
}

impl<S: Spool> Spool for StoredSpool<S> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        match self {
            StoredSpool::Inner(spool) => spool.write(bytes),
            StoredSpool::Memory(buf) => {
                buf.extend_from_slice(bytes);
                Ok(())
            }
            StoredSpool::File(file) => file.write(bytes),
            StoredSpool::Known { written, .. } => {
                *written += bytes.len() as u64;
                Ok(())
            }
        }
    }
}

impl<E: Executor> Stored<E> {
    pub(crate) fn new(inner: E, store: Option<ModelStore>) -> Self {
        Stored {
            inner,
            store,
            shared: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn store(&self) -> Option<&ModelStore> {
        self.store.as_ref()
    }

    /// Mounts the stored model `hash` with `config_json`: the one already
    /// mounted for another connection if the executor shares models, else
    /// from its file (verified first, and pinned while mounted).
    pub(crate) fn use_stored(
        &self,
        hash: Hash,
        config_json: String,
    ) -> Result<Arc<Mounted<E::Model>>, String> {
        let store = self.store.as_ref().ok_or("this node has no model store")?;
        let key = (hash, config_json);
        let sharing = self.inner.shares_models();
        if sharing {
            if let Some(live) = lock(&self.shared).get(&key).and_then(Weak::upgrade) {
                return Ok(live);
            }
        }
        let (path, pin) = store.pin(&hash)?;
        let model = self.inner.mount_file(key.1.clone(), &path)?;
        let mounted = Arc::new(Mounted {
            model,
            _pin: Some(pin),
        });
        if sharing {
            let mut shared = lock(&self.shared);
            shared.retain(|_, weak| weak.strong_count() > 0);
            // Two connections may have mounted it at once: keep the first.
            if let Some(live) = shared.get(&key).and_then(Weak::upgrade) {
                return Ok(live);
            }
            shared.insert(key, Arc::downgrade(&mounted));
        }
        Ok(mounted)
    }

    fn plain(model: E::Model) -> Arc<Mounted<E::Model>> {
        Arc::new(Mounted { model, _pin: None })
    }
}

impl<E: Executor> Executor for Stored<E> {
    type Model = Arc<Mounted<E::Model>>;
    type Spool = StoredSpool<E::Spool>;

    fn spools_uploads(&self) -> bool {
        self.store.is_some() || self.inner.spools_uploads()
    }

    fn open_spool(&self, upload: &UploadInfo) -> Result<Self::Spool, String> {
        match (&self.store, upload.sha256) {
            (Some(store), Some(hash)) if upload.offset == 0 && store.contains(&hash) => {
                Ok(StoredSpool::Known { hash, written: 0 })
            }
            (Some(store), Some(hash)) => store
                .begin_write(
                    hash,
                    upload.weights_len,
                    upload.offset,
                    &upload.config_json,
                    &upload.name,
                )
                .map(StoredSpool::File),
            _ if self.inner.spools_uploads() => {
                self.inner.open_spool(upload).map(StoredSpool::Inner)
            }
            _ => Ok(StoredSpool::Memory(Vec::new())),
        }
    }

    fn mount(
        &self,
        config_json: String,
        weights: Weights<Self::Spool>,
    ) -> Result<Self::Model, String> {
        let spool = match weights {
            Weights::Memory(bytes) => {
                return self
                    .inner
                    .mount(config_json, Weights::Memory(bytes))
                    .map(Self::plain)
            }
            Weights::Spooled(spool) => spool,
        };
        match spool {
            StoredSpool::Inner(spool) => self
                .inner
                .mount(config_json, Weights::Spooled(spool))
                .map(Self::plain),
            StoredSpool::Memory(bytes) => self
                .inner
                .mount(config_json, Weights::Memory(bytes))
                .map(Self::plain),
            // The node checked the hash of what arrived (a resumed upload's file checks its own).
            StoredSpool::File(file) => {
                let hash = file.hash();
                file.finish()?;
                self.use_stored(hash, config_json)
            }
            StoredSpool::Known { hash, .. } => self.use_stored(hash, config_json),
        }
    }

    fn mount_file(&self, config_json: String, path: &Path) -> Result<Self::Model, String> {
        self.inner.mount_file(config_json, path).map(Self::plain)
    }

    fn shares_models(&self) -> bool {
        self.inner.shares_models()
    }

    fn extensions(&self) -> donate_proto::Capabilities {
        self.inner.extensions()
    }

    fn infer(
        &self,
        model: &Self::Model,
        input_ids: &[i32],
        max_tokens: i64,
        job: &JobContext<'_>,
    ) -> Result<Vec<i32>, JobError> {
        self.inner.infer(&model.model, input_ids, max_tokens, job)
    }

    fn prompt(&self, prompt: &str, max_out: i64, job: &JobContext<'_>) -> Result<String, JobError> {
        self.inner.prompt(prompt, max_out, job)
    }

    fn chat(
        &self,
        prompt: &str,
        chat: &donate_proto::ChatJob,
        max_out: i64,
        job: &JobContext<'_>,
    ) -> Result<donate_proto::Reply, JobError> {
        self.inner.chat(prompt, chat, max_out, job)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
