#![cfg(feature = "dynamodb")]
