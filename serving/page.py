"""The service's page (GET /): drop or pick an image, see the ranked gallery thumbnails."""
from __future__ import annotations

__all__ = ["PAGE"]

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Centroid retrieval: search with an image</title>
<style>
body{font-family:sans-serif;margin:2em;max-width:1200px}
#drop{border:3px dashed #888;border-radius:8px;padding:2em;text-align:center;color:#555}
#drop.over{border-color:#2b83ba;color:#2b83ba}
#query img{max-height:200px;border:3px solid #2b83ba}
#results{display:flex;flex-wrap:wrap;gap:12px;margin-top:1em}
.result{width:120px;font-size:80%;text-align:center}
.result img{max-width:116px;max-height:200px;border:2px solid #ccc;display:block;margin:0 auto}
#status{margin:1em 0;color:#333}.error{color:#d7191c}
</style></head><body>
<h1>Search with an image</h1>
<div id="drop">Drop an image here, or <input type="file" id="file" accept="image/*">
 &nbsp; results: <input type="number" id="k" value="10" min="1" max="100" style="width:4em">
 &nbsp; re-ranking: <select id="rerank"><option value="none">none</option><option value="aqe">aqe</option>
 <option value="alpha-qe">alpha-qe</option><option value="kreciprocal">kreciprocal</option></select></div>
<div id="status"></div><div id="query"></div><div id="results"></div>
<script>
const drop = document.getElementById('drop'), status = document.getElementById('status');
function esc(s){return String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));}
async function search(file){
  const k = document.getElementById('k').value || 10, rerank = document.getElementById('rerank').value;
  document.getElementById('query').innerHTML = '<img alt="query" src="' + URL.createObjectURL(file) + '">';
  document.getElementById('results').innerHTML = '';
  status.className = ''; status.textContent = 'searching...';
  const form = new FormData(); form.append('image', file);
  let r;
  try { r = await fetch('search?k=' + encodeURIComponent(k) + '&rerank=' + encodeURIComponent(rerank),
                        {method: 'POST', body: form}); }
  catch (e) { status.className = 'error'; status.textContent = 'request failed: ' + e; return; }
  const body = await r.json();
  if (!r.ok) { status.className = 'error'; status.textContent = body.detail || ('HTTP ' + r.status); return; }
  status.textContent = 'index ' + body.index + ', version ' + body.version + ', model ' + body.model +
                       ': ' + body.results.length + ' results';
  document.getElementById('results').innerHTML = body.results.map(x =>
    '<div class="result" data-item="' + esc(x.item_id) + '">' +
    (x.image_id ? '<img alt="' + esc(x.image_id) + '" src="images/' + x.image_id.split('/').map(encodeURIComponent).join('/') + '">' : '') +
    '<div>#' + (x.rank + 1) + ' item ' + esc(x.item_id) + '</div><div>' + x.score.toFixed(3) + '</div></div>').join('');
}
document.getElementById('file').addEventListener('change', e => { if (e.target.files[0]) search(e.target.files[0]); });
['dragenter','dragover'].forEach(n => drop.addEventListener(n, e => { e.preventDefault(); drop.classList.add('over'); }));
['dragleave','drop'].forEach(n => drop.addEventListener(n, e => { e.preventDefault(); drop.classList.remove('over'); }));
drop.addEventListener('drop', e => { const f = e.dataTransfer.files[0]; if (f) search(f); });
</script></body></html>
"""
