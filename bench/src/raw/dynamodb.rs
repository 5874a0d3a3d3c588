//! The official AWS SDK doing what a dlock DynamoDB lease costs: one conditional
//! `UpdateItem` that takes a free item (`attribute_not_exists(owner)`, a fresh record
//! version, `ADD fence`) and one that removes the owner on `owner = :me`. On the URL's
//! table, which it creates (key attribute `key`, as dlock's) if it is missing.

use super::{owner_token, Token};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use aws_sdk_dynamodb::Client;
use std::time::Duration;

#[derive(Clone)]
pub struct Dynamo {
    client: Client,
    table: String,
}

fn s(text: &str) -> AttributeValue {
    AttributeValue::S(text.to_owned())
}

fn record_version() -> AttributeValue {
    s(&format!("{:016x}", rand::random::<u64>()))
}

impl Dynamo {
    /// `dynamodb://TABLE?region=…[&endpoint=http://…]`; credentials from the standard
    /// AWS chain, as dlock's.
    pub async fn connect(url: &str) -> Result<Dynamo, String> {
        use aws_smithy_http_client::tls;
        let parsed = url::Url::parse(url).map_err(|err| format!("{url}: {err}"))?;
        let table = parsed
            .host_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("{url}: no table name"))?
            .to_owned();
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader =
            aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
        for (name, value) in parsed.query_pairs() {
            match name.as_ref() {
                "region" => loader = loader.region(aws_config::Region::new(value.into_owned())),
                "endpoint" => loader = loader.endpoint_url(value.into_owned()),
                _ => {}
            }
        }
        let sdk = tokio::time::timeout(super::CALL_TIMEOUT, loader.load())
            .await
            .map_err(|_| "loading the AWS configuration did not finish in time".to_owned())?;
        let raw = Dynamo {
            client: Client::new(&sdk),
            table,
        };
        raw.create_table().await?;
        Ok(raw)
    }

    async fn create_table(&self) -> Result<(), String> {
        let invalid = |err: aws_sdk_dynamodb::error::BuildError| err.to_string();
        let attribute = AttributeDefinition::builder()
            .attribute_name("key")
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(invalid)?;
        let schema = KeySchemaElement::builder()
            .attribute_name("key")
            .key_type(KeyType::Hash)
            .build()
            .map_err(invalid)?;
        let create = self
            .client
            .create_table()
            .table_name(&self.table)
            .attribute_definitions(attribute)
            .key_schema(schema)
            .billing_mode(BillingMode::PayPerRequest)
            .send();
        match tokio::time::timeout(super::CALL_TIMEOUT, create).await {
            Ok(Ok(_)) => Ok(()),
            // Already there: dlock made it, or an earlier run did.
            Ok(Err(err))
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_resource_in_use_exception()) =>
            {
                Ok(())
            }
            Ok(Err(err)) => Err(format!(
                "create the table: {}",
                aws_sdk_dynamodb::error::DisplayErrorContext(&err)
            )),
            Err(_) => Err(format!(
                "create the table: no answer within {:?}",
                super::CALL_TIMEOUT
            )),
        }
    }

    pub async fn acquire(&self, key: &str, ttl: Duration) -> Result<Option<Token>, String> {
        let owner = owner_token();
        let ms = ttl.as_millis().to_string();
        let update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("key", s(key))
            .update_expression("SET #owner = :owner, #rvn = :rvn, #ttl = :ttl ADD #fence :one")
            .condition_expression("attribute_not_exists(#owner)")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#rvn", "rvn")
            .expression_attribute_names("#ttl", "ttl_ms")
            .expression_attribute_names("#fence", "fence")
            .expression_attribute_values(":owner", s(&owner))
            .expression_attribute_values(":rvn", record_version())
            .expression_attribute_values(":ttl", AttributeValue::N(ms))
            .expression_attribute_values(":one", AttributeValue::N("1".to_owned()))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::UpdatedNew)
            .send();
        match update_outcome(bounded_sdk("UpdateItem (take)", update).await)? {
            true => Ok(Some(Token::Owner(owner))),
            false => Ok(None),
        }
    }

    pub async fn release(&self, key: &str, owner: &str) -> Result<bool, String> {
        let update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("key", s(key))
            .update_expression("REMOVE #owner, #ttl SET #rvn = :rvn")
            .condition_expression("#owner = :me")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#ttl", "ttl_ms")
            .expression_attribute_names("#rvn", "rvn")
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":rvn", record_version())
            .send();
        update_outcome(bounded_sdk("UpdateItem (release)", update).await)
    }
}

/// An SDK call's outcome: `Ok(Some(()))` done, `Ok(None)` its condition failed.
type Outcome = Result<Option<()>, String>;

async fn bounded_sdk<T, R>(
    what: &str,
    call: impl std::future::Future<
        Output = Result<
            T,
            aws_sdk_dynamodb::error::SdkError<
                aws_sdk_dynamodb::operation::update_item::UpdateItemError,
                R,
            >,
        >,
    >,
) -> Outcome
where
    R: std::fmt::Debug,
{
    match tokio::time::timeout(super::CALL_TIMEOUT, call).await {
        Ok(Ok(_)) => Ok(Some(())),
        Ok(Err(err)) => match err.as_service_error() {
            Some(service) if service.is_conditional_check_failed_exception() => Ok(None),
            _ => Err(format!(
                "{what}: {}",
                aws_sdk_dynamodb::error::DisplayErrorContext(&err)
            )),
        },
        Err(_) => Err(format!(
            "{what}: no answer within {:?}",
            super::CALL_TIMEOUT
        )),
    }
}

fn update_outcome(outcome: Outcome) -> Result<bool, String> {
    outcome.map(|done| done.is_some())
}
