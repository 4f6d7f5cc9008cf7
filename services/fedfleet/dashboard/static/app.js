// fedfleet dashboard: polls the read-only JSON API and draws the jobs and their plots as SVG.
//
// Every node is built with createElement/textContent/setAttribute: nothing from the API is ever
// parsed as HTML (job names come from users). Attempts arrive incrementally (?start=N), so a
// week-long job costs one small answer per poll once the page has caught up.
'use strict';

(() => {
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const COLORS = ['#2f6fd6', '#e07b22', '#2f9e5b', '#d0403a', '#7a4fd1', '#138a8a', '#9c6b30'];
  const MAX_MARKERS = 400; // above this many points a series is drawn as a line only
  const KNOWN = new Set(['accuracy', 'loss']); // plotted in the fixed charts
  const state = {
    interval: 2000,
    jobs: [],
    selected: null,
    job: null,
    rows: [],
    next: 0,
    drawn: '',
  };

  // -- DOM helpers ------------------------------------------------------------------------------
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
  const pct = (v) => (isNum(v) ? `${(v * 100).toFixed(2)}%` : '–');
  const num = (v, digits = 4) => (isNum(v) ? v.toFixed(digits) : '–');
  const roundText = (j) => (j.rounds ? `${j.round} / ${j.rounds}` : String(j.round));

  function short(v) {
    if (!isNum(v)) return '';
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(1);
    if (Number.isInteger(v)) return String(v);
    return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(3);
  }

  // -- API --------------------------------------------------------------------------------------
  async function getJSON(path) {
    const response = await fetch(path, { cache: 'no-store', credentials: 'same-origin' });
    if (!response.ok) {
      const error = new Error(`${path}: HTTP ${response.status}`);
      error.status = response.status;
      throw error;
    }
    return response.json();
  }

  function setStatus(kind, text) {
    const node = $('status');
    node.dataset.state = kind;
    node.textContent = text;
  }

  // -- the jobs table ---------------------------------------------------------------------------
  function renderJobs() {
    const body = $('jobs').tBodies[0];
    body.replaceChildren();
    for (const j of state.jobs) {
      const link = el('button', { type: 'button', class: 'job-link' }, j.key);
      link.addEventListener('click', () => select(j.key));
      const row = el(
        'tr',
        { 'data-job': j.key },
        el('td', {}, link),
        el('td', {}, el('span', { class: 'phase', 'data-phase': j.phase }, j.phase)),
        el('td', { class: 'num' }, roundText(j)),
        el('td', { class: 'num' }, pct(j.accuracy)),
        el('td', { class: 'num' }, num(j.loss)),
        el('td', { class: 'num' }, num(j.epsilon, 3)),
        el('td', {}, j.reason || ''),
      );
      if (j.key === state.selected) row.classList.add('selected');
      body.append(row);
    }
    $('no-jobs').hidden = state.jobs.length > 0;
  }

  // -- one job ----------------------------------------------------------------------------------
  function select(key) {
    if (key === state.selected) return;
    state.selected = key;
    state.job = null;
    state.rows = [];
    state.next = 0;
    state.drawn = '';
    history.replaceState(null, '', `#job=${encodeURIComponent(key)}`);
    renderJobs();
    renderJob();
    // A refresh of the previous job may be running: chain one for this job after it.
    (inflight || Promise.resolve()).catch(() => {}).then(refreshJob).catch(() => {});
  }

  // One refresh at a time: two overlapping ones would both append the same attempts.
  let inflight = null;
  function refreshJob() {
    if (!inflight) {
      inflight = fetchJob().finally(() => { inflight = null; });
    }
    return inflight;
  }

  async function fetchJob() {
    const key = state.selected;
    for (let page = 0; page < 50 && key === state.selected; page += 1) {
      const q = `key=${encodeURIComponent(key)}&start=${state.next}`;
      let detail;
      try {
        detail = await getJSON(`/api/job?${q}`);
      } catch (error) {
        if (error.status === 404) {
          state.job = null;
          renderJob();
          return;
        }
        throw error;
      }
      if (key !== state.selected) return; // the user picked another job meanwhile
      state.job = detail.job;
      state.rows.push(...detail.attempts);
      state.next = detail.next;
      if (!detail.more) break;
    }
    renderJob();
  }

  const minmax = (values) => values.reduce(
    ([lo, hi], v) => [Math.min(lo, v), Math.max(hi, v)], [Infinity, -Infinity]);

  function renderJob() {
    const section = $('job');
    const j = state.job;
    section.hidden = !state.selected;
    if (!state.selected) return;
    $('job-name').textContent = state.selected;
    if (!j) {
      $('job-phase').textContent = 'not found';
      $('charts').replaceChildren();
      $('extra-charts').replaceChildren();
      state.drawn = '';
      return;
    }
    const phase = $('job-phase');
    phase.textContent = j.phase;
    phase.dataset.phase = j.phase;
    const roundNode = $('job-round');
    roundNode.textContent = roundText(j);
    roundNode.dataset.round = String(j.round);
    $('job-accuracy').textContent = pct(j.accuracy);
    $('job-loss').textContent = num(j.loss);
    $('job-epsilon').textContent = num(j.epsilon, 3);
    const abandoned = state.rows.filter((r) => r.abandoned).length;
    $('job-attempts').textContent = String(state.rows.length);
    $('job-abandoned').textContent = String(abandoned);
    $('job-reason').textContent = j.reason || '–';
    const stamp = `${state.selected}|${state.next}|${state.rows.length}`;
    if (stamp !== state.drawn) {
      drawCharts();
      state.drawn = stamp;
    }
  }

  function drawCharts() {
    const rows = state.rows;
    const committed = rows.filter((r) => !r.abandoned);
    const metric = (name) => committed
      .filter((r) => isNum(r.metrics[name]))
      .map((r) => [r.round, r.metrics[name]]);
    const byReason = new Map();
    for (const r of rows) {
      if (r.abandoned) byReason.set(r.reason || 'unknown', (byReason.get(r.reason || 'unknown') || 0) + 1);
    }
    $('charts').replaceChildren(
      lineChart('accuracy', 'Accuracy per round', [{ name: 'accuracy', points: metric('accuracy') }], pct),
      lineChart('loss', 'Loss per round', [{ name: 'loss', points: metric('loss') }]),
      lineChart('participants', 'Participants per round', [
        { name: 'selected', points: committed.map((r) => [r.round, r.selected]) },
        { name: 'reported', points: committed.map((r) => [r.round, r.reported]) },
      ]),
      lineChart('dropouts', 'Drop-outs per attempt', [
        { name: 'dropped', points: rows.map((r) => [r.round, r.dropped]) },
      ]),
      lineChart('durations', 'Attempt duration (s)', [
        { name: 'committed', points: committed.filter((r) => isNum(r.seconds)).map((r) => [r.round, r.seconds]) },
        { name: 'abandoned', points: rows.filter((r) => r.abandoned && isNum(r.seconds)).map((r) => [r.round, r.seconds]), dots: true },
      ]),
      barChart('abandoned', 'Abandoned attempts by reason', [...byReason.entries()].sort()),
    );
    // Every other numeric key of the metrics rows (device-reported metrics, federated evaluation,
    // epsilon, ...) gets its own chart, so new keys show up without a change to this page.
    const keys = new Set();
    for (const r of committed) for (const k of Object.keys(r.metrics)) if (!KNOWN.has(k)) keys.add(k);
    const extra = [...keys].sort().map((k) => lineChart(`metric:${k}`, k, [{ name: k, points: metric(k) }]));
    $('extra-title').hidden = extra.length === 0;
    $('extra-charts').replaceChildren(...extra);
  }

  // -- charts -----------------------------------------------------------------------------------
  const W = 460;
  const H = 200;
  const PAD = { left: 48, right: 12, top: 10, bottom: 26 };

  // "Nice" axis ticks: a step of 1, 2 or 5 times a power of ten, and as many decimals as it needs.
  function niceScale(lo, hi, n, integer) {
    const raw = (hi - lo) / n;
    const power = 10 ** Math.floor(Math.log10(raw));
    let step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || raw;
    if (integer) step = Math.max(1, Math.round(step));
    const start = Math.floor(lo / step) * step;
    const end = Math.ceil(hi / step) * step;
    const values = [];
    for (let v = start; v <= end + step / 2; v += step) values.push(v);
    const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
    return { lo: start, hi: end, values, decimals };
  }

  function frame(id, title, legend) {
    const figure = el('figure', { class: 'chart', 'data-chart': id });
    figure.append(el('figcaption', {}, title));
    if (legend.length > 1) {
      const box = el('div', { class: 'legend' });
      legend.forEach(([name, color]) => {
        const item = el('span', {}, name);
        item.style.setProperty('--swatch', color);
        box.append(item);
      });
      figure.append(box);
    }
    const plot = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': title });
    figure.append(plot);
    return [figure, plot];
  }

  function lineChart(id, title, series, yFormat = short) {
    const colored = series.map((s, i) => ({ ...s, color: COLORS[i % COLORS.length] }));
    const [figure, plot] = frame(id, title, colored.map((s) => [s.name, s.color]));
    const all = colored.flatMap((s) => s.points);
    plot.dataset.points = String(colored[0] ? colored[0].points.length : 0);
    if (all.length === 0) {
      plot.append(svg('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'empty' }, 'no data yet'));
      return figure;
    }
    let [x0, x1] = minmax(all.map((p) => p[0]));
    let [y0, y1] = minmax(all.map((p) => p[1]));
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    const counts = y0 >= 0; // counts and durations: keep the axis at or above zero
    if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
    if (counts) y0 = Math.max(0, y0);
    const xs = niceScale(x0, x1, 6, true);
    const ys = niceScale(y0, y1, 4, false);
    const sx = (x) => PAD.left + ((x - xs.lo) / (xs.hi - xs.lo)) * (W - PAD.left - PAD.right);
    const sy = (y) => H - PAD.bottom - ((y - ys.lo) / (ys.hi - ys.lo)) * (H - PAD.top - PAD.bottom);
    const tickLabel = yFormat === pct
      ? (t) => `${(t * 100).toFixed(Math.max(0, ys.decimals - 2))}%`
      : (t) => (Math.abs(t) >= 1e5 ? t.toExponential(1) : t.toFixed(ys.decimals));
    for (const t of ys.values) {
      plot.append(svg('line', { class: 'grid', x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t) }));
      plot.append(svg('text', { x: PAD.left - 4, y: sy(t) + 3, 'text-anchor': 'end' }, tickLabel(t)));
    }
    for (const t of xs.values) {
      plot.append(svg('text', { x: sx(t), y: H - PAD.bottom + 14, 'text-anchor': 'middle' }, String(t)));
    }
    plot.append(svg('line', { class: 'axis', x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: H - PAD.bottom }));
    plot.append(svg('line', { class: 'axis', x1: PAD.left, x2: W - PAD.right, y1: H - PAD.bottom, y2: H - PAD.bottom }));
    plot.append(svg('text', { x: W - PAD.right, y: H - 2, 'text-anchor': 'end' }, 'round'));
    for (const s of colored) {
      const pts = s.points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(' ');
      if (!s.dots && s.points.length > 1) {
        plot.append(svg('polyline', { points: pts, fill: 'none', stroke: s.color, 'stroke-width': 1.6 }));
      }
      if (s.points.length <= MAX_MARKERS || s.dots) {
        const group = svg('g', { 'data-series': s.name });
        for (const [x, y] of s.points) {
          const dot = svg('circle', { class: 'pt', cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r: 2.6, fill: s.color });
          dot.append(svg('title', {}, `${s.name} · round ${x}: ${yFormat(y)}`));
          group.append(dot);
        }
        plot.append(group);
      }
    }
    return figure;
  }

  function barChart(id, title, entries) {
    const [figure, plot] = frame(id, title, []);
    plot.dataset.points = String(entries.length);
    if (entries.length === 0) {
      plot.append(svg('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'empty' }, 'none abandoned'));
      return figure;
    }
    const max = minmax(entries.map((e) => e[1]))[1];
    const left = 150;
    const band = (H - PAD.top - PAD.bottom) / entries.length;
    entries.forEach(([reason, count], i) => {
      const y = PAD.top + i * band;
      const w = ((W - left - 40) * count) / max;
      const label = reason.length > 24 ? `${reason.slice(0, 23)}…` : reason;
      plot.append(svg('text', { x: left - 6, y: y + band / 2 + 3, 'text-anchor': 'end' }, label));
      const bar = svg('rect', { x: left, y: y + band * 0.15, width: Math.max(1, w), height: band * 0.7, fill: COLORS[3] });
      bar.append(svg('title', {}, `${reason}: ${count}`));
      plot.append(bar);
      plot.append(svg('text', { x: left + w + 4, y: y + band / 2 + 3 }, String(count)));
    });
    return figure;
  }

  // -- the loop ---------------------------------------------------------------------------------
  async function tick() {
    try {
      const { jobs } = await getJSON('/api/jobs');
      state.jobs = jobs;
      if (!state.selected) {
        const wanted = new URLSearchParams(location.hash.slice(1)).get('job');
        const pick = jobs.find((j) => j.key === wanted) || jobs.find((j) => j.phase === 'Running') || jobs[0];
        if (pick) select(pick.key);
      }
      renderJobs();
      if (state.selected) await refreshJob();
      setStatus('live', `live · updated ${new Date().toLocaleTimeString()}`);
    } catch (error) {
      setStatus('error', error.status === 503 ? 'store unavailable · retrying' : 'disconnected · retrying');
    } finally {
      setTimeout(tick, state.interval);
    }
  }

  async function start() {
    try {
      const config = await getJSON('/api/config');
      $('store').textContent = config.store ? `store ${config.store}` : '';
      if (isNum(config.interval) && config.interval > 0) state.interval = config.interval * 1000;
    } catch (error) {
      // the first tick reports the problem
    }
    tick();
  }

  window.addEventListener('hashchange', () => {
    const wanted = new URLSearchParams(location.hash.slice(1)).get('job');
    if (wanted) select(wanted);
  });
  start();
})();
