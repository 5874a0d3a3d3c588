//! The official mongodb driver doing what a dlock MongoDB lease costs: one
//! `findOneAndUpdate` with upsert whose filter matches a free document (an update
//! pipeline that stamps owner, fence and expiry from `$$NOW`), and one owner-checked
//! `updateOne` that clears the owner. In a collection of its own, so that the run never
//! meets dlock's documents.

use super::{bounded, owner_token, Token};
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::ReturnDocument;
use mongodb::{Client, Collection};
use std::future::IntoFuture;
use std::time::Duration;

const COLLECTION: &str = "dlock_bench_raw";

#[derive(Clone)]
pub struct Mongo {
    locks: Collection<Document>,
}

impl Mongo {
    /// `mongodb://host:port/db` (dlock's own query options are dropped).
    pub async fn connect(url: &str) -> Result<Mongo, String> {
        let base = url.split('?').next().unwrap_or(url);
        let client = bounded("connect to MongoDB", Client::with_uri_str(base)).await?;
        let database = client
            .default_database()
            .unwrap_or_else(|| client.database("dlock"));
        Ok(Mongo {
            locks: database.collection(COLLECTION),
        })
    }

    pub async fn acquire(&self, key: &str, ttl: Duration) -> Result<Option<Token>, String> {
        let owner = owner_token();
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let filter = doc! { "_id": key, "owner": Bson::Null };
        let update = vec![doc! { "$set": {
            "owner": owner.as_str(),
            "fence": { "$add": [ { "$ifNull": [ "$fence", 0_i64 ] }, 1_i64 ] },
            "expires_at": { "$add": [ "$$NOW", ms ] },
            "acquired_at": "$$NOW",
        } }];
        let call = self
            .locks
            .find_one_and_update(filter, update)
            .upsert(true)
            .return_document(ReturnDocument::After)
            .projection(doc! { "fence": 1 });
        match bounded("findOneAndUpdate", call.into_future()).await {
            Ok(Some(_)) => Ok(Some(Token::Owner(owner))),
            Ok(None) => Ok(None),
            // E11000: the upsert met a held document.
            Err(err) if err.contains("E11000") => Ok(None),
            Err(err) => Err(err),
        }
    }

    pub async fn release(&self, key: &str, owner: &str) -> Result<bool, String> {
        let filter = doc! { "_id": key, "owner": owner };
        let update = vec![doc! { "$set": { "owner": Bson::Null, "expires_at": "$$NOW" } }];
        let call = self.locks.update_one(filter, update);
        let result = bounded("updateOne", call.into_future()).await?;
        Ok(result.modified_count == 1)
    }
}
