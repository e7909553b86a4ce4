// index.html: sorts the run cards in the browser by the chosen key; runs without a value go last.
(function () {
  const cards = document.getElementById('cards');
  const key = document.getElementById('sort-key');
  const order = document.getElementById('sort-order');
  let descending = false;
  const missing = (v) => v === undefined || v === null;
  function compare(a, b) {
    const x = JSON.parse(a.dataset.sort)[key.value], y = JSON.parse(b.dataset.sort)[key.value];
    if (missing(x) || missing(y)) return missing(x) - missing(y);
    const c = typeof x === 'number' && typeof y === 'number' ? x - y
      : String(x).localeCompare(String(y), undefined, { numeric: true });
    return descending ? -c : c;
  }
  function sort() {
    for (const card of Array.from(cards.children).sort(compare)) cards.appendChild(card);
  }
  key.addEventListener('change', sort);
  order.addEventListener('click', () => {
    descending = !descending;
    order.textContent = descending ? 'descending' : 'ascending';
    sort();
  });
  sort();
})();
