// mpool status page: fetches the HTTP/JSON API every few seconds and draws it.
//
// Every value from the API goes into the page as text (textContent, attributes set through
// the DOM), never as markup: holders are free text. The token comes from the URL fragment
// (#token=..., removed from the address bar at once) or from the form shown when the API
// answers 401; it is kept in this tab's sessionStorage and sent as `Authorization: Bearer`.
'use strict';

(() => {
  const REFRESH_MS = 5000;
  const TOKEN_KEY = 'mpool.token';
  const SVG = 'http://www.w3.org/2000/svg';
  // Bar order: in use first, then ready, then busy, then failing.
  const STATES = ['leased', 'waking', 'hot', 'warm', 'parking', 'resetting', 'provisioning', 'deleting',
    'broken', 'golden'];

  let memoryToken = null; // when sessionStorage is unavailable
  let timer = null;
  let skewMs = 0; // server clock minus this browser's, from the Date header

  const $ = (id) => document.getElementById(id);

  // ---- token ----

  function storedToken() {
    try {
      return window.sessionStorage.getItem(TOKEN_KEY);
    } catch (_) {
      return memoryToken;
    }
  }

  function storeToken(t) {
    memoryToken = t;
    try {
      if (t === null) window.sessionStorage.removeItem(TOKEN_KEY);
      else window.sessionStorage.setItem(TOKEN_KEY, t);
    } catch (_) { /* kept in memory only */ }
  }

  // #token=... : keep it, then take it out of the address bar (and so out of the history).
  function tokenFromFragment() {
    const m = /^#token=(.*)$/.exec(window.location.hash);
    if (!m) return;
    let t = '';
    try {
      t = decodeURIComponent(m[1]).trim();
    } catch (_) { /* a malformed escape: ignore the fragment */ }
    if (t) storeToken(t);
    window.history.replaceState(null, '', window.location.pathname + window.location.search);
  }

  function askForToken(refused) {
    stop();
    $('login-why').textContent = refused
      ? 'mpool refused this token (401). Enter another one.'
      : 'This mpool asks for an API token.';
    $('login').hidden = false;
    $('updated').textContent = 'Waiting for a token.';
    $('login-token').focus();
  }

  function onLogin(ev) {
    ev.preventDefault();
    const t = $('login-token').value.trim();
    if (!t) return;
    $('login-token').value = '';
    storeToken(t);
    $('login').hidden = true;
    refresh();
  }

  // ---- API ----

  class Unauthorized extends Error {}

  async function api(path) {
    const headers = { Accept: 'application/json' };
    const t = storedToken();
    if (t) headers.Authorization = 'Bearer ' + t;
    const r = await fetch(path, { headers, cache: 'no-store' });
    if (r.status === 401) throw new Unauthorized(path);
    let body = null;
    try {
      body = await r.json();
    } catch (_) { /* not JSON */ }
    if (!r.ok) {
      const why = body && typeof body.message === 'string' ? body.message : 'HTTP ' + r.status;
      throw new Error(path + ': ' + why);
    }
    const date = Date.parse(r.headers.get('Date') || '');
    if (!Number.isNaN(date)) skewMs = date - Date.now();
    return body;
  }

  // ---- small helpers ----

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }

  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }

  function stateClass(s) {
    return STATES.includes(s) ? 'state-' + s : 'state-other';
  }

  function seconds(x) {
    if (!(x >= 0)) return '?';
    if (x < 0.001) return (x * 1000).toFixed(2) + ' ms';
    if (x < 1) return Math.round(x * 1000) + ' ms';
    if (x < 60) return x.toFixed(1) + ' s';
    return age(x * 1000);
  }

  function age(ms) {
    let s = Math.max(0, Math.floor(ms / 1000));
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    if (d) return d + 'd ' + h + 'h';
    if (h) return h + 'h ' + m + 'm';
    if (m) return m + 'm ' + s + 's';
    return s + 's';
  }

  function plural(n, noun) {
    return n + ' ' + noun + (n === 1 ? '' : 's');
  }

  function serverNow() {
    return Date.now() + skewMs;
  }

  function clock(ms) {
    return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  }

  // ---- health ----

  function renderHealth(h) {
    const item = (label, ok, text) => el('div', {}, el('dt', {}, label), el('dd', { class: ok ? 'ok' : 'bad' }, text));
    const d = h.daemon || {};
    const s = h.store || {};
    const i = h.isolation || {};
    $('health').replaceChildren(
      item('mpool', h.status === 'SERVING', h.status === 'SERVING' ? 'serving' : 'not serving'),
      item('multipassd', d.ok, (d.ok ? 'answers' : 'does not answer') + (d.queuedCalls ? ', ' + d.queuedCalls + ' calls queued' : '')),
      item('state store', s.ok, s.ok ? 'takes writes' : 'failing' + (s.error ? ': ' + s.error : '')),
      item('reconciled', h.reconciled, h.reconciled ? 'yes' : 'not yet'),
      item('isolation', i.state === 'isolated', (i.state || 'unknown') + (i.detail ? ': ' + i.detail : '')),
    );
  }

  // ---- pools ----

  function bar(pool) {
    const counts = pool.vms || {};
    const names = Object.keys(counts).filter((s) => counts[s] > 0)
      .sort((a, b) => (STATES.indexOf(a) + 1 || 99) - (STATES.indexOf(b) + 1 || 99) || a.localeCompare(b));
    const total = names.reduce((n, s) => n + counts[s], 0);
    const max = pool.config ? pool.config.maxSize : 0;
    const free = Math.max(0, max - total);
    const label = names.map((s) => counts[s] + ' ' + s).join(', ') || 'no VMs';
    const b = el('div', { class: 'bar', role: 'img', 'data-pool': pool.name,
      'aria-label': pool.name + ': ' + label + (max ? ' of at most ' + max : '') });
    for (const s of names) {
      const seg = el('span', { class: 'seg ' + stateClass(s), 'data-state': s, 'data-count': counts[s], title: s + ': ' + counts[s] });
      seg.style.flexGrow = String(counts[s]);
      b.append(seg);
    }
    if (free) {
      const seg = el('span', { class: 'seg free', title: free + ' more VMs allowed (max_size ' + max + ')' });
      seg.style.flexGrow = String(free);
      b.append(seg);
    }
    const legend = el('ul', { class: 'legend' });
    for (const s of names) legend.append(el('li', {}, el('i', { class: 'swatch ' + stateClass(s) }), s + ' ' + counts[s]));
    legend.append(el('li', { class: 'muted' }, total + (max ? ' of ' + max : '') + ' VMs'));
    return [b, legend];
  }

  // A small chart of one series: a bar per minute for the mean, a tick at the max.
  function chart(title, noun, points) { // noun: singular
    const W = 240, H = 56, TOP = 4;
    const w = W / (points.length || 1);
    const top = Math.max(0, ...points.map((p) => p.maxSeconds || 0));
    const count = points.reduce((c, p) => c + (p.count || 0), 0);
    const s = svg('svg', { class: 'chart', viewBox: '0 0 ' + W + ' ' + (H + TOP), preserveAspectRatio: 'none',
      role: 'img', 'aria-label': title, 'data-count': count });
    s.append(svg('line', { class: 'gridline', x1: 0, x2: W, y1: TOP, y2: TOP }));
    const y = (v) => TOP + H - (top > 0 ? (v / top) * H : 0);
    points.forEach((p, i) => {
      if (!p.count) return;
      const x = i * w;
      const mean = svg('rect', { class: 'mean', x: x + 0.5, width: Math.max(0.5, w - 1), y: y(p.meanSeconds),
        height: TOP + H - y(p.meanSeconds) });
      const tip = svg('title');
      tip.textContent = clock(Date.parse(p.minute)) + ': ' + plural(p.count, noun) + ', mean ' +
        seconds(p.meanSeconds) + ', max ' + seconds(p.maxSeconds);
      mean.append(tip);
      s.append(mean, svg('rect', { class: 'max', x: x, width: w, y: y(p.maxSeconds), height: 1.5 }));
    });
    const caption = el('figcaption', {}, title + ', last hour: ' + plural(count, noun) +
      (top > 0 ? ', max ' + seconds(top) + ' (top line)' : ''));
    const axis = el('div', { class: 'axis' }, el('span', {}, '60 min ago'), el('span', {}, 'bars: mean per minute'),
      el('span', {}, 'now'));
    return el('figure', {}, caption, s, axis);
  }

  function renderPools(pools, history) {
    const byPool = new Map((history.pools || []).map((h) => [h.pool, h]));
    const cards = pools.map((p) => {
      const c = p.config || {};
      const about = [c.image, c.cpus ? c.cpus + ' CPU' : '', c.memory, c.disk,
        c.reset ? String(c.reset).replace('RESET_STRATEGY_', '').toLowerCase() : ''].filter(Boolean).join(' · ');
      const card = el('section', { class: 'pool', 'data-pool': p.name }, el('h3', {}, p.name, el('span', { class: 'muted' }, about)));
      card.append(...bar(p));
      const waiting = el('b', p.waiters ? { class: 'waiting' } : {}, p.waiters);
      card.append(el('p', { class: 'facts' }, 'leases ', el('b', {}, p.leases), ' · waiters ', waiting,
        ' · keeps ', el('b', {}, c.minReady ?? '?'), ' ready (', el('b', {}, c.hot ?? '?'), ' hot)',
        ' · at most ', el('b', {}, c.maxSize ?? '?'), ' · generation ', el('b', {}, p.generation)));
      const h = byPool.get(p.name) || { acquire: [], reset: [] };
      card.append(el('div', { class: 'charts' }, chart('Acquire latency', 'acquire', h.acquire),
        chart('Reset duration', 'reset', h.reset)));
      return card;
    });
    if (!cards.length) cards.push(el('p', { class: 'muted' }, 'No pools this token may use.'));
    $('pools').replaceChildren(...cards);
  }

  // ---- leases ----

  function renderLeases(leases) {
    const now = serverNow();
    const rows = leases
      .slice()
      .sort((a, b) => String(a.grantedAt).localeCompare(String(b.grantedAt)))
      .map((l) => {
        const granted = Date.parse(l.grantedAt);
        const expires = Date.parse(l.expiresAt);
        return el('tr', { 'data-lease': l.id },
          el('td', {}, l.pool),
          el('td', { class: 'holder' }, l.holder || '—'),
          el('td', {}, el('code', {}, l.vm)),
          el('td', {}, Number.isNaN(granted) ? '?' : age(now - granted)),
          el('td', {}, Number.isNaN(expires) ? '?' : expires > now ? age(expires - now) : 'expiring'),
          el('td', {}, el('code', {}, l.id)));
      });
    $('leases').tBodies[0].replaceChildren(...rows);
    $('leases').hidden = rows.length === 0;
    $('no-leases').hidden = rows.length !== 0;
  }

  // ---- the loop ----

  function stop() {
    if (timer !== null) window.clearTimeout(timer);
    timer = null;
  }

  function schedule() {
    stop();
    timer = window.setTimeout(refresh, REFRESH_MS);
  }

  async function refresh() {
    try {
      const [health, pools, leases, history] = await Promise.all(
        ['v1/health', 'v1/pools', 'v1/leases', 'v1/history'].map(api));
      $('login').hidden = true;
      $('error').hidden = true;
      renderHealth(health);
      renderPools(pools.pools || [], history || {});
      renderLeases(leases.leases || []);
      $('updated').textContent = 'Updated ' + new Date().toLocaleTimeString() + ', every ' + REFRESH_MS / 1000 + ' s';
      schedule();
    } catch (e) {
      if (e instanceof Unauthorized) {
        const refused = storedToken() !== null;
        storeToken(null);
        askForToken(refused);
        return;
      }
      $('error').textContent = 'Cannot refresh: ' + (e && e.message ? e.message : String(e));
      $('error').hidden = false;
      schedule();
    }
  }

  function start() {
    tokenFromFragment();
    $('login-form').addEventListener('submit', onLogin);
    refresh();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
