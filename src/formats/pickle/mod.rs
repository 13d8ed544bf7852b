//! A safe reader for Python pickles (protocols 0-5, the opcodes that
//! `pickle`, numpy and `torch.save` emit).
//!
//! A pickle is a program that may import and call any Python callable. This
//! reader never calls anything: a `GLOBAL` is accepted only if the caller's
//! allowlist names it (anything else, such as `os.system`, is refused with an
//! error naming it), and calls of allowed globals become inert
//! [`Value::Call`] nodes that the caller interprets. Every length read from
//! the input is checked against the bytes that remain, and shared objects are
//! reference-counted, so a hostile file cannot make it allocate much more than
//! its own size.

mod value;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use anyhow::{Result, anyhow, bail};

pub use value::{Call, Dict, Value, check_nesting};

/// The deepest nesting of containers a pickle may build: a state dict
/// nests about five levels (dict, tensor rebuild call, storage id, tuple),
/// a numpy array in CIFAR's batches about as many.
pub const MAX_DEPTH: usize = 100;

/// What a pickle may reference: `(module, name)` pairs. Globals listed in
/// `dict_like` are constructors of an empty dict (OrderedDict) and become a
/// [`Value::Dict`] when called, so SETITEMS can fill them.
pub struct Allowlist<'a> {
    pub globals: &'a [(&'a str, &'a str)],
    pub dict_like: &'a [(&'a str, &'a str)],
}

/// `_codecs.encode(text, "latin1")` is how Python 3 pickles bytes under
/// protocol 2; it is evaluated (it only makes bytes), never called.
const CODECS_ENCODE: (&str, &str) = ("_codecs", "encode");

enum Item {
    Value(Value),
    Mark,
}

pub struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    allow: &'a Allowlist<'a>,
}

impl<'a> Unpickler<'a> {
    pub fn new(data: &'a [u8], allow: &'a Allowlist<'a>) -> Self {
        Unpickler {
            data,
            pos: 0,
            allow,
        }
    }

    /// Bytes consumed so far (legacy torch.save files hold several pickles
    /// and raw data one after the other).
    pub fn position(&self) -> usize {
        self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                anyhow!(
                    "pickle truncated: needs {n} bytes at offset {}, only {} left",
                    self.pos,
                    self.data.len() - self.pos
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<usize> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?) as usize)
    }

    fn u32(&mut self) -> Result<usize> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?) as usize)
    }

    fn u64(&mut self) -> Result<usize> {
        let v = u64::from_le_bytes(self.take(8)?.try_into()?);
        usize::try_from(v).map_err(|_| anyhow!("pickle length {v} is too large"))
    }

    fn line(&mut self) -> Result<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| anyhow!("pickle truncated: unterminated line at offset {}", self.pos))?;
        let s = &rest[..n];
        self.pos += n + 1;
        Ok(s)
    }

    fn text_line(&mut self) -> Result<String> {
        Ok(String::from_utf8_lossy(self.line()?).into_owned())
    }

    fn global(&self, module: &str, name: &str) -> Result<Value> {
        let pair = (module, name);
        if pair == CODECS_ENCODE
            || self.allow.globals.contains(&pair)
            || self.allow.dict_like.contains(&pair)
        {
            Ok(Value::Global(Rc::new((
                module.to_string(),
                name.to_string(),
            ))))
        } else {
            bail!("refusing to load the Python global {module}.{name}: it is not on the allowlist")
        }
    }

    /// Runs the pickle to its STOP opcode and returns the object it built,
    /// which nests no deeper than [`MAX_DEPTH`] and holds no container
    /// inside itself.
    pub fn load(&mut self) -> Result<Value> {
        let mut stack: Vec<Item> = Vec::new();
        let mut memo: HashMap<usize, Value> = HashMap::new();
        let built = self.run(&mut stack, &mut memo);
        // The stack and memo drop here, without recursion (see `impl Drop for Value`).
        built.and_then(|v| check_nesting(&v, MAX_DEPTH).map(|()| v))
    }

    fn run(&mut self, stack: &mut Vec<Item>, memo: &mut HashMap<usize, Value>) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            if op == b'.' {
                return match stack.pop() {
                    Some(Item::Value(v)) => Ok(v),
                    _ => bail!("pickle ends with an empty stack"),
                };
            }
            if let Some(v) = self.number(op)? {
                push(stack, v);
            } else if let Some(v) = self.text(op, at)? {
                push(stack, v);
            } else if !(self.container(op, stack)?
                || self.memo_op(op, stack, memo)?
                || self.call_op(op, at, stack)?
                || self.stack_op(op, stack)?)
            {
                bail!("unsupported pickle opcode 0x{op:02x} at offset {at}");
            }
        }
    }

    /// None, booleans, integers and floats.
    fn number(&mut self, op: u8) -> Result<Option<Value>> {
        Ok(Some(match op {
            b'N' => Value::None,
            0x88 => Value::Bool(true),
            0x89 => Value::Bool(false),
            b'J' => Value::Int(i32::from_le_bytes(self.take(4)?.try_into()?) as i64),
            b'K' => Value::Int(self.u8()? as i64),
            b'M' => Value::Int(self.u16()? as i64),
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    self.u8()? as usize
                } else {
                    self.u32()?
                };
                Value::Int(long_from_le(self.take(n)?)?)
            }
            b'I' | b'L' => {
                let line = self.text_line()?;
                let t = line.trim_end_matches('L');
                match t {
                    "01" => Value::Bool(true),
                    "00" => Value::Bool(false),
                    _ => Value::Int(t.parse().map_err(|_| anyhow!("bad integer {line:?}"))?),
                }
            }
            b'G' => Value::Float(f64::from_be_bytes(self.take(8)?.try_into()?)),
            b'F' => Value::Float(
                self.text_line()?
                    .parse()
                    .map_err(|_| anyhow!("bad float"))?,
            ),
            _ => return Ok(None),
        }))
    }

    /// str and bytes in their several encodings.
    fn text(&mut self, op: u8, at: usize) -> Result<Option<Value>> {
        Ok(Some(match op {
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => self.u32()?,
                    0x8c => self.u8()? as usize,
                    _ => self.u64()?,
                };
                let s = std::str::from_utf8(self.take(n)?)
                    .map_err(|_| anyhow!("invalid UTF-8 in a pickled str at offset {at}"))?;
                Value::Str(Rc::from(s))
            }
            b'T' | b'U' | b'B' | b'C' | 0x8e => {
                // Python 2 str (T, U) and bytes (B, C, 8e): raw bytes.
                let n = match op {
                    b'T' | b'B' => self.u32()?,
                    b'U' | b'C' => self.u8()? as usize,
                    _ => self.u64()?,
                };
                Value::Bytes(Rc::from(self.take(n)?))
            }
            b'V' => Value::Str(Rc::from(self.text_line()?.as_str())),
            b'S' => {
                let line = self.text_line()?;
                let t = line.trim_matches(|c| c == '\'' || c == '"');
                Value::Bytes(Rc::from(t.as_bytes()))
            }
            _ => return Ok(None),
        }))
    }

    /// Building and filling tuples, lists and dicts.
    fn container(&mut self, op: u8, stack: &mut Vec<Item>) -> Result<bool> {
        match op {
            b'}' => push(stack, Value::Dict(Rc::default())),
            b']' => push(stack, Value::List(Rc::default())),
            b')' => push(stack, Value::Tuple(Rc::default())),
            b'd' => {
                let items = pop_mark(stack)?;
                push(
                    stack,
                    Value::Dict(Rc::new(RefCell::new(Dict::new(pairs(items)?)))),
                )
            }
            b'l' => {
                let items = pop_mark(stack)?;
                push(stack, Value::List(Rc::new(RefCell::new(items))))
            }
            b't' => {
                let items = pop_mark(stack)?;
                push(stack, Value::Tuple(Rc::new(items)))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(pop(stack)?);
                }
                items.reverse();
                push(stack, Value::Tuple(Rc::new(items)))
            }
            b's' => {
                let v = pop(stack)?;
                let k = pop(stack)?;
                dict_extend(top(stack)?, vec![(k, v)])?;
            }
            b'u' => {
                let items = pop_mark(stack)?;
                dict_extend(top(stack)?, pairs(items)?)?;
            }
            b'a' => {
                let v = pop(stack)?;
                list_extend(top(stack)?, vec![v])?;
            }
            b'e' => {
                let items = pop_mark(stack)?;
                list_extend(top(stack)?, items)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// PUT and GET: the memo of shared objects.
    fn memo_op(
        &mut self,
        op: u8,
        stack: &mut Vec<Item>,
        memo: &mut HashMap<usize, Value>,
    ) -> Result<bool> {
        match op {
            b'q' | b'r' | b'p' => {
                let idx = match op {
                    b'q' => self.u8()? as usize,
                    b'r' => self.u32()?,
                    _ => self
                        .text_line()?
                        .parse()
                        .map_err(|_| anyhow!("bad PUT index"))?,
                };
                memo.insert(idx, top(stack)?.clone());
            }
            0x94 => {
                let idx = memo.len();
                memo.insert(idx, top(stack)?.clone());
            }
            b'h' | b'j' | b'g' => {
                let idx = match op {
                    b'h' => self.u8()? as usize,
                    b'j' => self.u32()?,
                    _ => self
                        .text_line()?
                        .parse()
                        .map_err(|_| anyhow!("bad GET index"))?,
                };
                let v = memo
                    .get(&idx)
                    .ok_or_else(|| {
                        anyhow!("pickle refers to memo entry {idx}, which was never stored")
                    })?
                    .clone();
                push(stack, v)
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Globals, calls, BUILD and persistent ids: recorded, never executed.
    fn call_op(&mut self, op: u8, at: usize, stack: &mut Vec<Item>) -> Result<bool> {
        match op {
            b'c' => {
                let module = self.text_line()?;
                let name = self.text_line()?;
                let g = self.global(&module, &name)?;
                push(stack, g)
            }
            0x93 => {
                let name = pop(stack)?;
                let module = pop(stack)?;
                let (Value::Str(m), Value::Str(n)) = (&module, &name) else {
                    bail!("STACK_GLOBAL needs two strs at offset {at}");
                };
                let g = self.global(m, n)?;
                push(stack, g)
            }
            b'R' | 0x81 => {
                let args = pop(stack)?;
                let func = pop(stack)?;
                let args = match args {
                    Value::Tuple(ref t) => t.as_ref().clone(),
                    other => bail!("call arguments must be a tuple, got {}", other.type_name()),
                };
                push(stack, self.apply(func, args)?)
            }
            b'b' => {
                let state = pop(stack)?;
                match top(stack)? {
                    Value::Call(c) => c.borrow_mut().state = Some(state),
                    // OrderedDict's BUILD carries instance attributes
                    // (torch's `_metadata`): irrelevant here.
                    Value::Dict(_) => {}
                    other => bail!("cannot BUILD a {}", other.type_name()),
                }
            }
            b'Q' => {
                let pid = pop(stack)?;
                push(stack, Value::PersistentId(Rc::new(pid)))
            }
            b'P' => {
                let line = self.text_line()?;
                push(
                    stack,
                    Value::PersistentId(Rc::new(Value::Str(Rc::from(line.as_str())))),
                )
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Protocol, framing, MARK and the stack's own operations.
    fn stack_op(&mut self, op: u8, stack: &mut Vec<Item>) -> Result<bool> {
        match op {
            0x80 => {
                let proto = self.u8()?;
                if proto > 5 {
                    bail!("unsupported pickle protocol {proto}");
                }
            }
            0x95 => {
                self.u64()?; // FRAME: a length hint
            }
            b'(' => stack.push(Item::Mark),
            b'0' => {
                stack
                    .pop()
                    .ok_or_else(|| anyhow!("POP on an empty stack"))?;
            }
            b'1' => {
                pop_mark(stack)?;
            }
            b'2' => {
                let v = top(stack)?.clone();
                push(stack, v)
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn apply(&self, func: Value, args: Vec<Value>) -> Result<Value> {
        let Value::Global(ref g) = func else {
            bail!(
                "pickle calls a {}, which is not an allowed global",
                func.type_name()
            );
        };
        let pair = (g.0.as_str(), g.1.as_str());
        if pair == CODECS_ENCODE {
            let text = match args.first() {
                Some(Value::Str(s)) => s.clone(),
                _ => bail!("_codecs.encode expects a str"),
            };
            let bytes = Value::Str(text)
                .as_bytes()
                .ok_or_else(|| anyhow!("_codecs.encode: text is not latin-1"))?;
            return Ok(Value::Bytes(bytes));
        }
        if self.allow.dict_like.contains(&pair) {
            let init = match args.first() {
                Some(v) => v
                    .items()
                    .map(pairs_from_tuples)
                    .transpose()?
                    .unwrap_or_default(),
                None => Vec::new(),
            };
            return Ok(Value::Dict(Rc::new(RefCell::new(Dict::new(init)))));
        }
        Ok(Value::Call(Rc::new(RefCell::new(Call {
            module: g.0.clone(),
            name: g.1.clone(),
            args,
            state: None,
        }))))
    }
}

fn long_from_le(bytes: &[u8]) -> Result<i64> {
    if bytes.is_empty() {
        return Ok(0);
    }
    if bytes.len() > 8 {
        bail!("integer of {} bytes is too large", bytes.len());
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
    buf[..bytes.len()].copy_from_slice(bytes);
    Ok(i64::from_le_bytes(buf))
}

fn push(stack: &mut Vec<Item>, v: Value) {
    stack.push(Item::Value(v));
}

fn pop(stack: &mut Vec<Item>) -> Result<Value> {
    match stack.pop() {
        Some(Item::Value(v)) => Ok(v),
        Some(Item::Mark) => bail!("malformed pickle: unexpected MARK"),
        None => bail!("malformed pickle: stack underflow"),
    }
}

fn top(stack: &[Item]) -> Result<&Value> {
    match stack.last() {
        Some(Item::Value(v)) => Ok(v),
        _ => bail!("malformed pickle: no object on the stack"),
    }
}

fn pop_mark(stack: &mut Vec<Item>) -> Result<Vec<Value>> {
    let mut items = Vec::new();
    loop {
        match stack.pop() {
            Some(Item::Value(v)) => items.push(v),
            Some(Item::Mark) => break,
            None => bail!("malformed pickle: MARK not found"),
        }
    }
    items.reverse();
    Ok(items)
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        bail!("malformed pickle: odd number of dict items");
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn pairs_from_tuples(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    items
        .into_iter()
        .map(|kv| match kv.items().as_deref() {
            Some([k, v]) => Ok((k.clone(), v.clone())),
            _ => bail!("OrderedDict items must be pairs"),
        })
        .collect()
}

fn dict_extend(target: &Value, items: Vec<(Value, Value)>) -> Result<()> {
    match target {
        Value::Dict(d) => {
            let mut d = d.borrow_mut();
            for (k, v) in items {
                d.insert(k, v);
            }
            Ok(())
        }
        other => bail!("SETITEM on a {}", other.type_name()),
    }
}

fn list_extend(target: &Value, items: Vec<Value>) -> Result<()> {
    match target {
        Value::List(l) => {
            l.borrow_mut().extend(items);
            Ok(())
        }
        other => bail!("APPEND on a {}", other.type_name()),
    }
}
