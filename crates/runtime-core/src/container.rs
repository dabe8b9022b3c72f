use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// A typed registry of shared services (the database pool, a client directory): one value
/// per type, registered at start-up and looked up by type.
#[derive(Debug, Default)]
pub struct ServiceContainer {
    services: RwLock<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl ServiceContainer {
    /// Registers `service`, replacing an earlier one of the same type.
    pub fn insert<T: Any + Send + Sync>(&self, service: Arc<T>) {
        self.insert_dyn(service);
    }

    /// Registers a type-erased service under its concrete type.
    pub fn insert_dyn(&self, service: Arc<dyn Any + Send + Sync>) {
        let id = (*service).type_id();
        let mut map = self.services.write().unwrap_or_else(|e| e.into_inner());
        map.insert(id, service);
    }

    /// The service of type `T`, if registered.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let map = self.services.read().unwrap_or_else(|e| e.into_inner());
        map.get(&TypeId::of::<T>())
            .cloned()
            .and_then(|s| s.downcast::<T>().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Pool(u32);

    #[test]
    fn services_are_found_by_type() {
        let c = ServiceContainer::default();
        assert!(c.get::<Pool>().is_none());
        c.insert(Arc::new(Pool(3)));
        let erased: Arc<dyn Any + Send + Sync> = Arc::new(String::from("dir"));
        c.insert_dyn(erased);
        assert_eq!(c.get::<Pool>().as_deref(), Some(&Pool(3)));
        assert_eq!(
            c.get::<String>().as_deref().map(String::as_str),
            Some("dir")
        );
    }
}
