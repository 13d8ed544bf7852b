//! The values a pickle builds: Python's scalars, strings and containers,
//! allowlisted globals, and calls recorded but never executed. Containers
//! are shared (`Rc`), as the pickle's memo shares them; walking them is
//! iterative and by identity ([`check_nesting`], and dropping: see
//! `impl Drop for Value`), so a deep,
//! shared or self-containing value can neither overflow the stack nor be
//! visited once per path.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use anyhow::{Result, bail};

#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    /// Insertion-ordered, as Python's dict and OrderedDict are.
    Dict(Rc<RefCell<Dict>>),
    /// An allowlisted global, not yet called: `module.name`.
    Global(Rc<(String, String)>),
    /// `func(*args)`, recorded but never executed; BUILD stores `state`.
    Call(Rc<RefCell<Call>>),
    /// `persistent_load(pid)`: torch.save's reference to a storage.
    PersistentId(Rc<Value>),
}

/// A dict's entries in insertion order, with an index of its text keys so
/// that an insert or a look-up costs O(1), not a scan (a pickle may hold
/// hundreds of thousands of keys).
#[derive(Debug, Default)]
pub struct Dict {
    pub items: Vec<(Value, Value)>,
    index: HashMap<String, usize>,
}

impl Dict {
    pub fn new(items: Vec<(Value, Value)>) -> Dict {
        let mut d = Dict::default();
        for (k, v) in items {
            d.insert(k, v);
        }
        d
    }

    /// Later keys replace earlier ones, as in Python (keys compared as
    /// text; other keys are kept as they come).
    pub fn insert(&mut self, k: Value, v: Value) {
        match k.as_text() {
            Some(key) => match self.index.get(&key) {
                Some(&i) => self.items[i].1 = v,
                None => {
                    self.index.insert(key, self.items.len());
                    self.items.push((k, v));
                }
            },
            None => self.items.push((k, v)),
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.items[i].1)
    }
}

#[derive(Debug)]
pub struct Call {
    pub module: String,
    pub name: String,
    pub args: Vec<Value>,
    pub state: Option<Value>,
}

impl Value {
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// Text of a str, or of a Python 2 str (bytes read as latin-1).
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.to_string()),
            Value::Bytes(b) => Some(b.iter().map(|&c| c as char).collect()),
            _ => None,
        }
    }

    /// Bytes of a bytes object, or of a str holding latin-1 code points (how
    /// Python 2 strs come back with `encoding="latin1"`).
    pub fn as_bytes(&self) -> Option<Rc<[u8]>> {
        match self {
            Value::Bytes(b) => Some(b.clone()),
            Value::Str(s) => {
                let v: Option<Vec<u8>> = s.chars().map(|c| u8::try_from(c as u32).ok()).collect();
                v.map(Rc::from)
            }
            _ => None,
        }
    }

    /// Elements of a tuple or list.
    pub fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(t) => Some(t.as_ref().clone()),
            Value::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }

    /// Entries of a dict (or of an `OrderedDict` call), in order.
    pub fn entries(&self) -> Option<Vec<(Value, Value)>> {
        match self {
            Value::Dict(d) => Some(d.borrow().items.clone()),
            _ => None,
        }
    }

    /// Looks up a str (or Python 2 str) key in a dict.
    pub fn get(&self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(d) => d.borrow().get(key).cloned(),
            _ => None,
        }
    }

    pub fn call(&self) -> Option<std::cell::Ref<'_, Call>> {
        match self {
            Value::Call(c) => Some(c.borrow()),
            _ => None,
        }
    }

    pub fn type_name(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::List(_) => "list".into(),
            Value::Dict(_) => "dict".into(),
            Value::Global(g) => format!("{}.{}", g.0, g.1),
            Value::Call(c) => format!("{}.{}(...)", c.borrow().module, c.borrow().name),
            Value::PersistentId(_) => "persistent id".into(),
        }
    }
}

impl Value {
    /// A container's identity (its shared allocation); None for scalars.
    pub fn id(&self) -> Option<usize> {
        match self {
            Value::Tuple(t) => Some(Rc::as_ptr(t) as *const u8 as usize),
            Value::List(l) => Some(Rc::as_ptr(l) as *const u8 as usize),
            Value::Dict(d) => Some(Rc::as_ptr(d) as *const u8 as usize),
            Value::Call(c) => Some(Rc::as_ptr(c) as *const u8 as usize),
            Value::PersistentId(p) => Some(Rc::as_ptr(p) as *const u8 as usize),
            _ => None,
        }
    }

    /// The values this one holds directly (a call's arguments and state).
    pub fn children(&self) -> Vec<Value> {
        match self {
            Value::Tuple(t) => t.as_ref().clone(),
            Value::List(l) => l.borrow().clone(),
            Value::Dict(d) => {
                let d = d.borrow();
                d.items
                    .iter()
                    .flat_map(|(k, v)| [k.clone(), v.clone()])
                    .collect()
            }
            Value::Call(c) => {
                let c = c.borrow();
                c.args.iter().cloned().chain(c.state.clone()).collect()
            }
            Value::PersistentId(p) => vec![p.as_ref().clone()],
            _ => Vec::new(),
        }
    }
}

/// Fails when `root` nests containers more than `max` deep or holds a
/// container inside itself. Iterative (an explicit stack), and each
/// container is walked once however often it is shared.
pub fn check_nesting(root: &Value, max: usize) -> Result<()> {
    struct Frame {
        id: usize,
        children: Vec<Value>,
        next: usize,
        height: usize,
    }
    let Some(id) = root.id() else {
        return Ok(());
    };
    let mut height: HashMap<usize, usize> = HashMap::new();
    let mut on_path: HashSet<usize> = HashSet::from([id]);
    let mut frames = vec![Frame {
        id,
        children: root.children(),
        next: 0,
        height: 0,
    }];
    while let Some(top) = frames.last_mut() {
        if let Some(child) = top.children.get(top.next).cloned() {
            top.next += 1;
            let Some(cid) = child.id() else { continue };
            if let Some(&h) = height.get(&cid) {
                top.height = top.height.max(h + 1);
            } else if on_path.contains(&cid) {
                bail!("the pickle holds a container inside itself");
            } else if frames.len() >= max {
                bail!("the pickle nests containers more than {max} deep");
            } else {
                on_path.insert(cid);
                frames.push(Frame {
                    id: cid,
                    children: child.children(),
                    next: 0,
                    height: 0,
                });
            }
            continue;
        }
        let done = frames.pop().expect("a frame");
        on_path.remove(&done.id);
        height.insert(done.id, done.height);
        if let Some(parent) = frames.last_mut() {
            parent.height = parent.height.max(done.height + 1);
        }
    }
    Ok(())
}

/// Dropping a value never recurses: a container whose last reference
/// goes hands its children to a work list first, so a value nested two
/// million deep (or one dropped half-built by a failing pickle, anywhere)
/// is freed in a loop, not one stack frame per level.
impl Drop for Value {
    fn drop(&mut self) {
        let mut work = Vec::new();
        take_children(self, &mut work);
        while let Some(mut v) = work.pop() {
            take_children(&mut v, &mut work);
        }
    }
}

/// Moves the children of `v` into `work` if `v` holds the last reference
/// to its container (a shared one is left to its other owners).
fn take_children(v: &mut Value, work: &mut Vec<Value>) {
    match v {
        Value::Tuple(t) => {
            if let Some(items) = Rc::get_mut(t) {
                work.append(items);
            }
        }
        Value::List(l) => {
            if let Some(items) = Rc::get_mut(l) {
                work.append(items.get_mut());
            }
        }
        Value::Dict(d) => {
            if let Some(d) = Rc::get_mut(d) {
                let d = d.get_mut();
                d.index.clear();
                work.extend(d.items.drain(..).flat_map(|(k, v)| [k, v]));
            }
        }
        Value::Call(c) => {
            if let Some(c) = Rc::get_mut(c) {
                let c = c.get_mut();
                work.append(&mut c.args);
                work.extend(c.state.take());
            }
        }
        Value::PersistentId(p) => {
            if let Some(inner) = Rc::get_mut(p) {
                work.push(std::mem::replace(inner, Value::None));
            }
        }
        _ => {}
    }
}
