//! Cluster mode: several nodes, one server (PostgreSQL orders and stores, Redis carries live
//! traffic and presence).

pub mod order;
