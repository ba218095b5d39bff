//! The registry: who is who at run time. Resolves providers and accounts by id or name (an
//! account also as `provider/account`), and a model to the providers that serve it. Rebuilt by the
//! supervisor after every change and shared read-only, so a request never waits for a message to
//! find its pool.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use actix::Addr;

use super::account::{AccountActor, LeaseControl};
use super::catalog::ProviderSpec;
use super::pool::PoolActor;
use crate::config::Credentials;

#[derive(Debug)]
pub struct ProviderEntry {
    pub spec: ProviderSpec,
    pub pool: Addr<PoolActor>,
}

#[derive(Debug)]
pub struct AccountEntry {
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub provider_id: Arc<str>,
    pub provider: Arc<str>,
    pub addr: Addr<AccountActor>,
    /// The account's lease epoch, read by holders without a message.
    pub control: Arc<LeaseControl>,
    pub credentials: Option<Arc<Credentials>>,
}

impl AccountEntry {
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.provider, self.name)
    }
}

/// Why a lookup found nothing usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lookup {
    #[error("{0} not found")]
    NotFound(String),
    #[error("`{name}` is ambiguous: use one of {}", candidates.join(", "))]
    Ambiguous {
        name: String,
        candidates: Vec<String>,
    },
}

#[derive(Debug, Default)]
pub struct Registry {
    providers: Vec<Arc<ProviderEntry>>,
    accounts: Vec<Arc<AccountEntry>>,
    account_ids: HashMap<Arc<str>, usize>,
    /// Indices into `accounts` per provider id.
    by_provider: HashMap<Arc<str>, Vec<usize>>,
}

/// The registry as published: readers clone the `Arc` and never hold the lock.
pub type SharedRegistry = Arc<RwLock<Arc<Registry>>>;

pub fn read(shared: &SharedRegistry) -> Arc<Registry> {
    shared.read().unwrap_or_else(|e| e.into_inner()).clone()
}

impl Registry {
    pub fn new(
        mut providers: Vec<Arc<ProviderEntry>>,
        mut accounts: Vec<Arc<AccountEntry>>,
    ) -> Registry {
        providers.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        accounts.sort_by(|a, b| (&a.provider, &a.name).cmp(&(&b.provider, &b.name)));
        let account_ids = accounts
            .iter()
            .enumerate()
            .map(|(i, a)| (a.id.clone(), i))
            .collect();
        let mut by_provider: HashMap<Arc<str>, Vec<usize>> = HashMap::new();
        for (i, a) in accounts.iter().enumerate() {
            by_provider
                .entry(a.provider_id.clone())
                .or_default()
                .push(i);
        }
        Registry {
            providers,
            accounts,
            account_ids,
            by_provider,
        }
    }

    pub fn providers(&self) -> &[Arc<ProviderEntry>] {
        &self.providers
    }

    pub fn accounts(&self) -> &[Arc<AccountEntry>] {
        &self.accounts
    }

    /// The accounts of the provider with id `provider_id`.
    pub fn accounts_of<'a>(
        &'a self,
        provider_id: &str,
    ) -> impl Iterator<Item = &'a Arc<AccountEntry>> + 'a {
        self.by_provider
            .get(provider_id)
            .into_iter()
            .flatten()
            .map(|&i| &self.accounts[i])
    }

    /// A provider by id or name.
    pub fn provider(&self, id_or_name: &str) -> Result<&Arc<ProviderEntry>, Lookup> {
        self.providers
            .iter()
            .find(|p| &*p.spec.id == id_or_name || &*p.spec.name == id_or_name)
            .ok_or_else(|| Lookup::NotFound(format!("provider `{id_or_name}`")))
    }

    /// An account by id, `provider/account`, or its bare name when unique.
    pub fn account(&self, reference: &str) -> Result<&Arc<AccountEntry>, Lookup> {
        if let Some(&i) = self.account_ids.get(reference) {
            return Ok(&self.accounts[i]);
        }
        if let Some((provider, name)) = reference.split_once('/') {
            if let Some(found) = self.accounts.iter().find(|a| {
                (&*a.provider == provider || &*a.provider_id == provider) && &*a.name == name
            }) {
                return Ok(found);
            }
        }
        let matches: Vec<&Arc<AccountEntry>> = self
            .accounts
            .iter()
            .filter(|a| &*a.name == reference)
            .collect();
        match matches.as_slice() {
            [] => Err(Lookup::NotFound(format!("account `{reference}`"))),
            [one] => Ok(one),
            many => Err(Lookup::Ambiguous {
                name: reference.to_string(),
                candidates: many.iter().map(|a| a.qualified_name()).collect(),
            }),
        }
    }

    /// The active providers serving `model`, with the model name to send upstream. `model` is a
    /// model name, or `provider/model` to pick one provider.
    pub fn route(&self, model: &str) -> Vec<(Arc<ProviderEntry>, Arc<str>)> {
        let serving = |p: &Arc<ProviderEntry>, name: &str| {
            p.spec
                .active
                .then(|| p.spec.model(name).map(|m| (p.clone(), m.name.clone())))
                .flatten()
        };
        let direct: Vec<_> = self
            .providers
            .iter()
            .filter_map(|p| serving(p, model))
            .collect();
        if !direct.is_empty() {
            return direct;
        }
        match model.split_once('/') {
            Some((provider, name)) => self
                .providers
                .iter()
                .filter(|p| &*p.spec.name == provider)
                .filter_map(|p| serving(p, name))
                .collect(),
            None => Vec::new(),
        }
    }

    /// Every routable `(provider, model)`.
    pub fn models(&self) -> Vec<(Arc<str>, Arc<str>)> {
        self.providers
            .iter()
            .filter(|p| p.spec.active)
            .flat_map(|p| {
                p.spec
                    .models
                    .iter()
                    .map(|m| (p.spec.name.clone(), m.name.clone()))
            })
            .collect()
    }
}
