// Client-side search over search-index.json, which the docs build writes next to search.html.
(function () {
  "use strict";

  var results = document.getElementById("results");
  var status = document.getElementById("search-status");
  var input = document.getElementById("q");
  var pages = [];

  input.value = new URLSearchParams(window.location.search).get("q") || "";

  function matches(page, words) {
    var text = (page.title + " " + page.section + " " + page.summary).toLowerCase();
    return words.every(function (w) { return text.indexOf(w) !== -1; });
  }

  function render() {
    var words = input.value.toLowerCase().split(/\s+/).filter(Boolean);
    var found = pages.filter(function (p) { return matches(p, words); });
    results.textContent = "";
    found.forEach(function (page) {
      var li = document.createElement("li");
      var a = document.createElement("a");
      a.href = page.url;  // relative to search.html, which sits at the site root
      a.textContent = page.title;
      var section = document.createElement("span");
      section.className = "section";
      section.textContent = page.section;
      var summary = document.createElement("span");
      summary.className = "summary";
      summary.textContent = page.summary;
      li.append(a, section, summary);
      results.append(li);
    });
    status.textContent = words.length
      ? found.length + " of " + pages.length + " pages match \u201c" + input.value.trim() + "\u201d."
      : "All " + pages.length + " pages:";
  }

  // Relative URL on purpose: the site is served under a mount prefix that the page cannot know.
  fetch("search-index.json", { headers: { Accept: "application/json" } })
    .then(function (response) {
      if (!response.ok) { throw new Error("HTTP " + response.status); }
      return response.json();
    })
    .then(function (data) {
      pages = data.pages;
      render();
      results.dataset.loaded = "true";
      input.addEventListener("input", render);
    })
    .catch(function (err) {
      results.dataset.error = String(err);
      status.textContent = "The search index could not be loaded (" + err.message + ").";
    });
})();
